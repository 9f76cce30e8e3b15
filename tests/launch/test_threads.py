"""CPU threads per process (rlhf_exp.launch.threads): the CPUs a process may use (affinity, cgroup quota),
divided among the run's local processes; 1 for the embedded/small models; the user's OMP_NUM_THREADS wins;
RLHF_EXP_THREADS=torch keeps torch's default. No timing here: benchmarks/contention.py measures."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from rlhf_exp.launch import threads
from tests.conftest import only_run, read_json, run_cli

ENV_KEYS = ("OMP_NUM_THREADS", "RLHF_EXP_THREADS", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_CPUS_ON_NODE",
            "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.setenv(key, "")  # restored afterwards even when the code under test sets it
        monkeypatch.delenv(key)
    monkeypatch.setattr(threads, "_applied", None)


def cfg(num_processes=1, source="hub", num_params=None):
    return SimpleNamespace(hardware=SimpleNamespace(num_processes=num_processes),
                           model=SimpleNamespace(source=source, num_params=num_params))


# --- cgroup quota -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0),
                                        ("50000 100000", 0.5), ("", None), ("garbage", None)])
def test_cpu_max_is_parsed(text, cpus):
    assert threads.parse_cpu_max(text) == cpus


def fake_cgroup(tmp_path, own="0::/\n"):
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(own)
    root = tmp_path / "cgroup"
    root.mkdir()
    return root, proc


def test_cgroup_v2_quota_of_the_root(tmp_path):
    root, proc = fake_cgroup(tmp_path)
    assert threads.quota_cpus(root, proc) is None  # no cpu.max: no limit
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cpus(root, proc) is None
    (root / "cpu.max").write_text("300000 100000\n")
    assert threads.quota_cpus(root, proc) == 3.0


def test_cgroup_v2_quota_of_the_process_cgroup_and_its_parents(tmp_path):
    root, proc = fake_cgroup(tmp_path, "0::/job/step\n")
    (root / "job" / "step").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text("250000 100000\n")
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cpus(root, proc) == 2.5  # the smallest limit on the way up counts


@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path, controller):
    root, proc = fake_cgroup(tmp_path, f"4:memory:/\n2:{controller}:/\n")
    d = root / controller
    d.mkdir()
    (d / "cpu.cfs_period_us").write_text("100000\n")
    (d / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert threads.quota_cpus(root, proc) is None
    (d / "cpu.cfs_quota_us").write_text("150000\n")
    assert threads.quota_cpus(root, proc) == 1.5


@pytest.mark.parametrize("affinity, quota, usable", [(8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (8, 0.5, 1),
                                                     (2, 4.0, 2), (1, None, 1)])
def test_usable_cpus_is_affinity_capped_by_the_quota(monkeypatch, affinity, quota, usable):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(threads, "quota_cpus", lambda *a: quota)
    assert threads.usable_cpus() == usable


def test_affinity_counts_the_cores_of_this_process_mask(tmp_path, monkeypatch):
    assert 1 <= threads.affinity_cpus() <= (os.cpu_count() or 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    for cpu, core in {0: 0, 1: 1, 2: 0, 3: 1, 4: 2, 5: 2}.items():  # 3 cores, 2 hyperthreads each
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert threads.affinity_cpus(tmp_path) == 3  # cpus 0 and 2 are one core
    assert threads.affinity_cpus(tmp_path / "absent") == 4  # no topology: logical CPUs


def test_slurm_allocation_caps_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 16)
    monkeypatch.setattr(threads, "quota_cpus", lambda *a: None)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert threads.usable_cpus() == 3
    assert threads.cpu_threads(cfg(num_processes=4)) == 3  # each SLURM task was given its own CPUs


# --- the rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpus, processes, expected", [(8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 4, 1),
                                                       (1, 1, 1)])
def test_usable_cpus_are_divided_among_the_local_processes(cpus, processes, expected):
    assert threads.cpu_threads(cfg(num_processes=processes), cpus=cpus) == expected


def test_torchrun_local_world_size_counts_the_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.cpu_threads(cfg(num_processes=8), cpus=8) == 2


@pytest.mark.parametrize("model", [SimpleNamespace(source="embedded", num_params=None),
                                   SimpleNamespace(source="hub", num_params=1_000_000),
                                   {"source": "embedded"}])
def test_small_models_use_one_thread(model):
    assert threads.cpu_threads(cfg(), model=model, cpus=16) == 1


def test_a_large_or_unknown_model_uses_its_share(monkeypatch):
    assert threads.cpu_threads(cfg(num_params=7_000_000_000), cpus=16) == 16
    assert threads.cpu_threads(cfg(num_params=None), cpus=16) == 16


@pytest.mark.parametrize("value, expected", [("3", 3), ("1", 1), ("0", 1), ("4,2", 4)])
def test_the_users_omp_num_threads_wins(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert threads.cpu_threads(cfg(source="embedded"), cpus=16) == expected
    assert threads.cpu_threads(cfg(num_processes=8), cpus=16) == expected


def test_an_explicit_environ_is_read_instead_of_the_process_one():
    assert threads.cpu_threads(cfg(), environ={"OMP_NUM_THREADS": "5"}, cpus=16) == 5
    assert threads.cpu_threads(cfg(), environ={"RLHF_EXP_THREADS": "torch"}, cpus=16) is None


def test_the_switch_keeps_torchs_default_or_sets_a_count(monkeypatch):
    monkeypatch.setenv("RLHF_EXP_THREADS", "torch")
    assert threads.cpu_threads(cfg(source="embedded"), cpus=16) is None
    monkeypatch.setenv("RLHF_EXP_THREADS", "3")
    assert threads.cpu_threads(cfg(source="embedded"), cpus=16) == 3
    monkeypatch.setenv("RLHF_EXP_THREADS", "many")
    with pytest.raises(ValueError, match="RLHF_EXP_THREADS"):
        threads.cpu_threads(cfg(), cpus=16)


def test_the_real_configs(compose):
    tiny = compose(["hardware=cpu_x2"])
    assert threads.cpu_threads(tiny, cpus=8) == 1
    from rlhf_exp.launch.distributed import _worker_threads

    assert _worker_threads(tiny) == {"OMP_NUM_THREADS": "1"}  # set before each worker imports torch
    big = compose(["model=qwen2_5_7b", "hardware=cpu_x2"])
    assert threads.cpu_threads(big, cpus=8) == 4


# --- applying it --------------------------------------------------------------------------------------

def test_apply_sets_the_env_and_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert threads.apply(1) == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        # set by this process, not the user: a later run in the same process (a sweep) recomputes
        assert threads.user_threads() is None
        assert threads.cpu_threads(cfg(), cpus=2) == 2
        assert threads.apply(None) is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_apply_keeps_the_users_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        threads.apply(threads.cpu_threads(cfg(source="embedded")))
        assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_computing_the_count_imports_no_torch():
    import subprocess

    code = ("import sys; from types import SimpleNamespace as N; from rlhf_exp.launch import threads; "
            "n = threads.cpu_threads(N(hardware=N(num_processes=1), model=N(source='hub', num_params=None))); "
            "assert n >= 1, n; assert 'torch' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


# --- a real run -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("env, expected", [({}, 1), ({"OMP_NUM_THREADS": "2"}, 2)])
def test_a_real_run_records_its_threads(tmp_path, env, expected):
    """The embedded SFT, two steps: the manifest records the threads the run used."""
    proc = run_cli(["phase.max_steps=2", f"output_root={tmp_path}"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(only_run(tmp_path, "sft") / "manifest.json")["cpu_threads"] == expected
