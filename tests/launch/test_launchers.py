"""Launchers and multi-process runs without a cluster: the launcher group's mapping onto
hydra-submitit-launcher, the sbatch script, and 2-process (gloo) runs matching 1-process runs."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, only_run, read_json, read_metrics, run_cli
from tests.launch.standins import parent_overrides, slurm_standins


def hydra_launcher(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import rlhf_exp.cli  # noqa: F401  (registers the schemas)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True), cfg
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("hardware, nodes, tasks, gpus", [("a100x8", 1, 8, 8), ("a100x1", 1, 1, 1), ("cpu_x2", 1, 2, 0)])
def test_slurm_resources_come_from_the_hardware_preset(hardware, nodes, tasks, gpus):
    launcher, _ = hydra_launcher("launcher=slurm", f"hardware={hardware}", "launcher.partition=gpu",
                                 "launcher.account=proj", "launcher.time_min=240", "launcher.setup=[module load cuda]")
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, tasks, gpus)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "proj", 240)
    assert launcher["setup"] == ["export SLURM_KILL_BAD_EXIT=1", "module load cuda"]


def test_multi_node_hardware_sets_slurm_nodes():
    launcher, _ = hydra_launcher("launcher=slurm", "hardware=a100x8", "hardware.num_nodes=2")
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 8


def test_local_launcher_is_hydras_basic_one():
    launcher, cfg = hydra_launcher()
    assert launcher["_target_"] == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert cfg.launcher.name == "local"


def test_submitit_local_launcher_maps_tasks():
    launcher, _ = hydra_launcher("launcher=submitit_local", "hardware=cpu_x2")
    assert launcher["_target_"].endswith("LocalLauncher") and launcher["tasks_per_node"] == 2


def normalised_script(text: str) -> str:
    """A rendered sbatch script with what changes per run (time-stamped folders, the python path)
    replaced by placeholders, as shown in the README."""
    text = re.sub(r"[^\s=]*/sweeps/[0-9_-]+/\.submitit", "<sweep dir>/.submitit", text)
    return re.sub(r"\S+/python3?(\.\d+)? -u -m submitit", "<python> -u -m submitit", text)


def test_sbatch_script_for_a100x8_is_one_task_per_gpu_and_in_readme():
    from rlhf_exp.launch.slurm import compose_sbatch_script

    script = compose_sbatch_script(["launcher=slurm", "hardware=a100x8", "phase=ppo", "launcher.partition=gpu",
                                    "launcher.account=my-project", "launcher.time_min=240",
                                    "launcher.cpus_per_task=8", "launcher.setup=['source ~/venvs/rlhf/bin/activate']"])
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --time=240",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@120", "source ~/venvs/rlhf/bin/activate"):
        assert line in script.splitlines(), (line, script)
    assert re.search(r"^srun .* -u -m submitit\.core\._submit ", script, re.M)
    readme = (ROOT / "README.md").read_text()
    assert normalised_script(script).strip() in readme, "README's sbatch script differs from the rendered one:\n" + \
        normalised_script(script)


@pytest.mark.parametrize("with_slurm", [True, False], ids=["slurm-installed", "no-srun-on-path"])
def test_dry_run_shows_the_sbatch_script(tmp_path, with_slurm):
    """Also on a machine without SLURM (a laptop preparing a submission): submitit's srun check is
    not needed to render the script. There the dry run shows the script and then refuses, as the
    real command would (exit 2). "slurm-installed" is a stand-in sbatch/sinfo first on PATH (a
    controller that answers), so the case does not depend on a real cluster being up."""
    if with_slurm:
        env, sbatch_calls = slurm_standins(tmp_path / "bin")
    else:
        env, sbatch_calls = {"PATH": str(Path(sys.executable).parent)}, None
    out = tmp_path / "out"
    proc = run_cli(["launcher=slurm", "hardware=a100x8", "phase=sft", "dry_run=true", f"output_root={out}"], env=env)
    if with_slurm:
        assert proc.returncode == 0, proc.stderr
        assert "rlhf_exp: error:" not in proc.stderr
        assert not sbatch_calls.exists(), "a dry run submitted a job: " + sbatch_calls.read_text()
    else:
        assert proc.returncode == 2, proc.stderr
        assert "rlhf_exp: error: launcher=slurm submits with sbatch, which is not on PATH" in proc.stderr
    assert "#SBATCH --ntasks-per-node=8" in proc.stdout and "launcher  : slurm" in proc.stdout
    assert "#SBATCH --cpus-per-task=8" in proc.stdout.splitlines() and "#SBATCH --mem=768GB" in proc.stdout.splitlines()
    assert not out.exists()


def test_slurm_launcher_without_sbatch_is_one_clear_error(tmp_path):
    proc = run_cli(["launcher=slurm", f"output_root={tmp_path}"], env={"PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 2
    assert "launcher=slurm submits with sbatch, which is not on PATH" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_multi_node_needs_slurm(tmp_path):
    proc = run_cli(["hardware=cpu_x2", "hardware.num_nodes=2", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "only SLURM starts processes on several machines" in proc.stderr


def test_ppo_batch_must_split_over_processes(compose):
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.config.validate import validate

    with pytest.raises(ConfigError, match=r"phase.rollout_batch_size=6 must split evenly into phase.num_mini_batches=2"):
        validate(compose(["phase=ppo", "hardware=cpu_x2", "phase.rollout_batch_size=6", "phase.num_mini_batches=2"]))


# ------------------------------------------------------------------ 2 processes == 1 process


def losses(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]


def pair(tmp_path: Path, phase: str, one: list[str], two: list[str]) -> tuple[Path, Path]:
    """Run the same job on 1 process and on 2 (hardware=cpu_x2); return both run folders."""
    dirs = []
    for name, args in (("one", one), ("two", two)):
        root = tmp_path / name
        proc = run_cli([f"phase={phase}", f"output_root={root}", *args])
        assert proc.returncode == 0, proc.stderr[-3000:]
        dirs.append(only_run(root, phase))
    manifest = read_json(dirs[1] / "manifest.json")
    assert manifest["world_size"] == 2 and manifest["status"] == "succeeded"
    # as accelerate set it up: a process group of 2, not just two processes each training alone
    assert read_json(dirs[1] / "summary.json")["metrics"]["num_processes"] == 2
    assert read_json(dirs[0] / "manifest.json")["world_size"] == 1
    assert not (dirs[1].parent / "runs").exists() and len(list(dirs[1].parent.iterdir())) == 1  # one folder, not two
    return dirs[0], dirs[1]


# Tolerance: relative 1e-4 on every logged loss. Measured differences are ~1e-7 (float summation order in
# gloo's all-reduce and in smaller matmuls); a wrong data split, a missing gradient average, or a loss
# averaged per process instead of per token shows up as 1e-2 or more.
RTOL = 1e-4


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-6), (a, b)


@pytest.mark.slow
def test_two_process_sft_matches_one_process(tmp_path):
    common = ["phase.max_steps=24", "phase.logging_steps=4", "phase.eval_steps=12"]
    one, two = pair(tmp_path, "sft", [*common, "phase.per_device_train_batch_size=64"],
                    [*common, "hardware=cpu_x2", "phase.per_device_train_batch_size=32"])
    assert_close(losses(one, "train/loss"), losses(two, "train/loss"))
    assert_close(losses(one, "eval/loss"), losses(two, "eval/loss"))
    s1, s2 = read_json(one / "summary.json")["metrics"], read_json(two / "summary.json")["metrics"]
    assert s2["train_loss_last"] < s2["train_loss_first"]  # it learned
    assert math.isclose(s1["gold_score"], s2["gold_score"], abs_tol=0.01)
    assert (two / "checkpoints" / "final" / "checkpoint.json").is_file()


@pytest.mark.slow
def test_two_process_dpo_matches_one_process(tmp_path, sft_run):
    # 500 eval pairs in batches of 50: whole batches on both processes. (TRL averages eval batches' means,
    # so an uneven last batch weighs differently on 1 and 2 processes: measured 0.2% on eval/loss.)
    common = [f"phase.sft_run={sft_run}", "phase.max_steps=12", "phase.logging_steps=3", "phase.eval_steps=6",
              "phase.per_device_eval_batch_size=50"]
    one, two = pair(tmp_path, "dpo", [*common, "phase.per_device_train_batch_size=32"],
                    [*common, "hardware=cpu_x2", "phase.per_device_train_batch_size=16"])
    assert_close(losses(one, "train/loss"), losses(two, "train/loss"))
    assert_close(losses(one, "eval/loss"), losses(two, "eval/loss"))
    assert losses(two, "train/loss")[-1] < losses(two, "train/loss")[0]
    # the held-out evaluation (rlhf_exp.heldout): each process answers half the prompts, samples included
    for key in ("eval/gold", "eval/kl", "eval/response_length", "eval/distinct_2", "eval/self_bleu"):
        assert_close(losses(one, key), losses(two, key))


@pytest.mark.slow
def test_two_process_ppo_matches_one_process(tmp_path, sft_run, rm_run):
    # target_kl low enough that some steps stop their epochs early: every rank must stop together
    common = [f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}", "phase.max_steps=4", "phase.ppo_epochs=4",
              "phase.target_kl=0.003"]
    one, two = pair(tmp_path, "ppo", common, [*common, "hardware=cpu_x2"])
    for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/kl_coef",
                "ppo/early_stopped_epochs", "ppo/gold_reward"):
        assert_close(losses(one, key), losses(two, key))
    assert sum(losses(two, "ppo/early_stopped_epochs")) > 0  # the early stop happened, on both ranks alike
    assert losses(two, "ppo/value_loss")[-1] < losses(two, "ppo/value_loss")[0]


@pytest.mark.slow
def test_submitit_tasks_become_torch_distributed_workers(tmp_path):
    """launcher=submitit_local with 2 tasks: SLURM's code path (a pickled Hydra job per task, the
    torch.distributed variables from submitit's environment), no cluster needed. A single job is
    submitted as a one-job sweep."""
    proc = run_cli(["launcher=submitit_local", "hardware=cpu_x2", "phase.max_steps=8", f"output_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one-job sweep" in proc.stderr
    (job,) = [p for p in (tmp_path / "sweeps").glob("*/*_sft") if p.is_dir()]
    manifest = read_json(job / "manifest.json")
    assert manifest["status"] == "succeeded" and manifest["world_size"] == 2 and manifest["launcher"] == "submitit_local"
    metrics = read_json(job / "summary.json")["metrics"]
    assert metrics["steps"] == 8 and metrics["num_processes"] == 2
    assert len(read_metrics(job)) > 0


@pytest.mark.slow
def test_parallel_launcher_runs_sweep_jobs_side_by_side_with_the_cpus_split(tmp_path):
    """launcher=parallel: the jobs of a batch run at the same time (their runs overlap in time), each with its
    share of the machine's CPUs; the sweep summary and its plots follow as for any sweep."""
    import datetime as dt

    proc = run_cli(["-m", "phase.max_steps=30", "seed=0,1,2", "launcher=parallel", "launcher.parallel_jobs=2",
                    f"output_root={tmp_path}"], env={"RLHF_EXP_THREADS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launcher=parallel: 2 jobs at once on this machine" in proc.stderr
    jobs = sorted(p for p in (tmp_path / "sweeps").glob("*/*_sft") if p.is_dir())
    manifests = [read_json(j / "manifest.json") for j in jobs]
    assert [m["status"] for m in manifests] == ["succeeded"] * 3 and {m["launcher"] for m in manifests} == {"parallel"}
    span = [(dt.datetime.fromisoformat(m["start_time"]), dt.datetime.fromisoformat(m["end_time"])) for m in manifests]
    assert span[0][0] < span[1][1] and span[1][0] < span[0][1], span  # jobs 0 and 1 ran at the same time
    assert span[2][0] >= min(span[0][1], span[1][1]), span  # the third waited for a free slot (batches of 2)
    assert (jobs[0].parent / "sweep_summary.json").is_file()


def broken_sft_run(sft_run: Path, dest: Path) -> Path:
    """A copy of a good SFT run whose checkpoint names an architecture transformers does not know: it passes every
    check before launch (manifest succeeded; config.json and the weights present and whole) and fails where the
    job loads it. (A deleted weights file is refused before launch: tests/tracking/test_parents.py.)"""
    import json
    import shutil

    shutil.copytree(sft_run, dest)
    manifest = read_json(dest / "manifest.json")
    manifest["checkpoint"] = str(dest / "checkpoints" / "final")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    config = dest / "checkpoints" / "final" / "config.json"
    config.write_text(json.dumps({**read_json(config), "model_type": "no_such_model"}))
    return dest


@pytest.mark.slow
def test_a_failed_sweep_job_does_not_stop_the_others(tmp_path, sft_run):
    broken = broken_sft_run(sft_run, tmp_path / "broken")
    proc = run_cli(["-m", "phase=dpo", f"phase.sft_run={sft_run},{broken}", "phase.max_steps=4",
                    f"output_root={tmp_path / 'out'}"])
    assert proc.returncode == 1
    tail = proc.stderr.split("rlhf_exp: error: 1 of 2 sweep jobs failed:")[1]
    assert "1: failed:" in tail and "no_such_model" in tail
    (summary,) = (tmp_path / "out" / "sweeps").glob("*/sweep_summary.json")
    statuses = sorted(job["status"] for job in read_json(summary)["jobs"])
    assert statuses == ["failed", "succeeded"]


@pytest.mark.slow
def test_a_failed_worker_fails_the_run_with_its_error(tmp_path, sft_run):
    broken = broken_sft_run(sft_run, tmp_path / "broken")
    proc = run_cli(["phase=dpo", "hardware=cpu_x2", f"phase.sft_run={broken}", f"output_root={tmp_path / 'out'}"])
    assert proc.returncode == 1  # a failure, not bad input (2)
    assert "no_such_model" in proc.stderr  # the worker's own traceback
    assert proc.stderr.strip().splitlines()[-1].startswith("rlhf_exp: error: 2-process run failed (torchrun exit 1)")
    run = only_run(tmp_path / "out", "dpo")
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "failed" and "no_such_model" in manifest["error"]


def test_site_file_sets_launcher_defaults_and_the_command_line_wins():
    site = ROOT / "conf" / "site" / "local.yaml"
    if site.exists():
        pytest.skip(f"{site} exists (a real site file); not overwriting it")
    site.write_text("# @package _global_\nlauncher:\n  partition: site-gpu\n  account: site-proj\n"
                    "  setup: ['module load cuda']\n")
    try:
        launcher, cfg = hydra_launcher("launcher=slurm")
        assert (launcher["partition"], launcher["account"]) == ("site-gpu", "site-proj")
        assert launcher["setup"] == ["export SLURM_KILL_BAD_EXIT=1", "module load cuda"]
        launcher, _ = hydra_launcher("launcher=slurm", "launcher.partition=other")
        assert launcher["partition"] == "other" and launcher["account"] == "site-proj"
    finally:
        site.unlink()


@pytest.mark.parametrize("hardware, stage", [("a100x8", 3), ("a100x4", 3)])
def test_zero_presets_reach_the_trl_trainers_as_deepspeed_config(compose, tmp_path, hardware, stage):
    from rlhf_exp.launch.trl_args import training_kwargs

    cfg = OmegaConf.to_object(compose([f"hardware={hardware}", "model=llama3_8b", "data=hh_rlhf"]))
    ds = training_kwargs(cfg, tmp_path, has_eval=True)["deepspeed"]
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # batch size, accumulation, clipping and precision come from the same arguments, never twice
    assert {ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")} == {"auto"}


def test_fsdp_and_ddp_mappings(compose, tmp_path):
    from rlhf_exp.launch.trl_args import training_kwargs

    fsdp = training_kwargs(OmegaConf.to_object(compose(["hardware=a100x4", "hardware.distributed=fsdp"])), tmp_path, True)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2 and "deepspeed" not in fsdp  # FSDP2
    ddp = training_kwargs(OmegaConf.to_object(compose(["hardware=cpu_x2"])), tmp_path, True)
    assert "deepspeed" not in ddp and "fsdp" not in ddp and ddp["ddp_find_unused_parameters"] is False


def test_sharded_presets_are_checked_before_launch(compose, monkeypatch):
    import importlib.util

    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.launch.distributed import check_sharding

    check_sharding(compose(["phase=ppo", "hardware=a100x8"]))  # PPO runs under ZeRO-3 (issue 12)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs DeepSpeed: pip install -e '.\[deepspeed\]'"):
        check_sharding(compose(["hardware=a100x8"]))
    check_sharding(compose(["phase=ppo", "hardware=a100x8", "hardware.distributed=ddp", "hardware.lora=true"]))


def test_a_sweep_dry_run_submits_nothing_and_leaves_no_folder(tmp_path):
    """With a stand-in SLURM (sbatch/sinfo first on PATH, a controller that answers): nothing is
    submitted (the stand-in sbatch is never called) and nothing is written."""
    env, sbatch_calls = slurm_standins(tmp_path / "bin")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(["-m", "launcher=slurm", "hardware=a100x8", "phase=sft", "seed=0,1", "dry_run=true",
                    f"output_root={out}"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "nothing is submitted to launcher=slurm" in proc.stderr
    assert proc.stdout.count("#SBATCH --ntasks-per-node=8") == 1 and proc.stdout.count("dry run: nothing loaded") == 2
    assert not sbatch_calls.exists(), "a dry run submitted a job: " + sbatch_calls.read_text()
    assert not any(out.iterdir())


def test_an_optuna_dry_run_explains_itself(tmp_path):
    """PPO needs an SFT and a reward-model parent: stand-in run folders, given by phase.sft_run and
    phase.reward_run, outside output_root (which stays empty)."""
    parents = parent_overrides("ppo", tmp_path / "parents")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(["-m", "sweep=ppo_optuna", "dry_run=true", *parents, f"output_root={out}"])
    assert proc.returncode == 0, proc.stderr
    assert "an Optuna search picks its trials from results as they come" in proc.stdout
    assert not any(out.iterdir())


@pytest.mark.parametrize("env, threads", [
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "2"}, 4),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "3"}, 3),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "1"}, 1),
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "OMP_NUM_THREADS": "5"}, None),  # the user's setting wins
    ({}, None),  # not a SLURM job: torch's own default
])
def test_a_slurm_task_uses_the_cpus_it_was_given(monkeypatch, env, threads):
    import os

    from rlhf_exp.launch import distributed

    for key in ("SLURM_JOB_ID", "SLURM_CPUS_ON_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, "")  # so that monkeypatch restores it, even when set by the code under test
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert distributed.limit_cpu_threads() == threads
        assert torch.get_num_threads() == (threads or before)
        assert os.environ.get("OMP_NUM_THREADS") == env.get("OMP_NUM_THREADS", str(threads) if threads else None)
    finally:
        torch.set_num_threads(before)
