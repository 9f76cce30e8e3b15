"""``dry_run=true`` runs every check the real command runs: each command the real launch refuses is
refused by its dry run too, with the same message and exit status (2), and neither writes anything.

Each case runs the real CLI twice, as a user would (the command, then the command + dry_run=true), in an
empty working folder (output_root is the default, outputs/ there), with the machine shaped through the
environment: PATH without sbatch, stand-ins for sinfo/sbatch/nvidia-smi, DeepSpeed hidden from Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_exp.launch.distributed import _torch_version, visible_gpus

PARENTS = "starts from an sft run of model=tiny data=synthetic with their default settings"


def _script(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def machines(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Environments for the cases: name -> variables to set."""
    root = tmp_path_factory.mktemp("machines")
    path = os.environ.get("PATH", "")
    env: dict[str, dict[str, str]] = {"here": {}, "no_sbatch": {"PATH": str(Path(sys.executable).parent)}}
    for name, sinfo in (("slurm_down", "echo 'sinfo: error: Unable to contact slurm controller (connect failure)' >&2\n"
                                       "exit 1\n"),
                        ("slurm_up", "echo debug\n")):
        (root / name).mkdir()
        _script(root / name, "sbatch", "exit 1\n")  # never reached: every case is refused before submitting
        _script(root / name, "sinfo", sinfo)
        env[name] = {"PATH": f"{root / name}:{path}"}
    for gpus in (2, 8):
        folder = root / f"gpus_{gpus}"
        folder.mkdir()
        lines = "".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})'\n" for i in range(gpus))
        _script(folder, "nvidia-smi", lines)
        env[f"gpus_{gpus}"] = {"PATH": f"{folder}:{path}"}
    hidden = root / "no_deepspeed"
    hidden.mkdir()
    # importlib.util.find_spec (and import) see no DeepSpeed when its sys.modules entry is None
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    env["no_deepspeed"] = {"PYTHONPATH": str(hidden)}
    return env


GPU_LESS = visible_gpus()[0] == 0
CPU_TORCH = (_torch_version() or "").endswith("+cpu")


def case(name: str, args: list[str], machine: str, says: str, skip: str | None = None):
    """A refused command: its arguments, the machine it runs on (see machines), what the refusal says."""
    return pytest.param(args, machine, says, id=name, marks=[pytest.mark.skipif(True, reason=skip)] if skip else [])


CASES = [
    case("rm-without-parents", ["phase=rm"], "here", f"phase=rm {PARENTS}"),
    case("ppo-without-parents", ["phase=ppo"], "here", f"phase=ppo {PARENTS}"),
    case("dpo-without-parents", ["phase=dpo"], "here", f"phase=dpo {PARENTS}"),
    case("sweep-without-parents", ["-m", "phase=dpo", "phase.beta=0.1,0.2"], "here", f"phase=dpo {PARENTS}"),
    case("slurm-without-sbatch", ["launcher=slurm"], "no_sbatch", "launcher=slurm submits with sbatch, which is not on PATH"),
    case("slurm-controller-down", ["launcher=slurm", "hardware=a100x8"], "slurm_down",
         "launcher=slurm: the SLURM controller does not answer (sinfo: sinfo: error: Unable to contact slurm controller"),
    case("cpu-on-two-nodes", ["hardware=cpu", "hardware.num_nodes=2"], "here",
         "hardware.distributed=none with 2 processes"),
    case("two-nodes-without-slurm", ["hardware=cpu_x2", "hardware.num_nodes=2"], "here",
         "hardware=cpu_x2 spans 2 nodes; only SLURM starts processes on several machines: add launcher=slurm"),
    case("zero-without-deepspeed", ["hardware=cpu_x2", "hardware.distributed=deepspeed_zero2"], "no_deepspeed",
         "hardware.distributed=deepspeed_zero2 (hardware=cpu_x2) needs DeepSpeed: pip install -e '.[deepspeed]'"),
    case("gpu-preset-without-gpu", ["hardware=a100x8"], "here",
         "hardware=a100x8 needs CUDA GPUs and none is visible here (no NVIDIA driver",
         skip=None if GPU_LESS else "this machine has a GPU"),
    case("fewer-gpus-than-processes", ["hardware=a100x4"], "gpus_2",
         "hardware=a100x4 starts 4 processes, one per GPU, and this machine has 2 GPUs (nvidia-smi -L)"),
    case("cpu-only-torch", ["hardware=a100x1"], "gpus_8",
         "hardware=a100x1 needs CUDA GPUs and none is visible here (torch 2",
         skip=None if CPU_TORCH else "torch here is a CUDA build"),
    case("hardware-sweep-on-slurm", ["-m", "launcher=slurm", "hardware=cpu,cpu_x2"], "slurm_up",
         "launcher=slurm submits a sweep as one job array with one set of resources, those of the command without its "
         "swept values (tasks_per_node=1), but hardware=cpu_x2 needs tasks_per_node=2. Run one sweep per set of "
         "resources, with hardware fixed in each (e.g. python -m rlhf_exp -m hardware=cpu_x2 ...)"),
    case("launcher-sweep", ["-m", "launcher=local,submitit_local"], "here", "a sweep runs through one launcher"),
    case("pipeline-on-two-nodes", ["pipeline=rlhf", "hardware=cpu_x2", "hardware.num_nodes=2"], "here",
         "only SLURM starts processes on several machines"),
]


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "CUDA_VISIBLE_DEVICES")}
    full.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **env})
    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=cwd, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _error(stderr: str) -> str:
    """The refusal: from the first ``rlhf_exp: error:`` to the end (a message may span lines)."""
    assert "rlhf_exp: error: " in stderr, stderr[-2000:]
    return stderr[stderr.index("rlhf_exp: error: "):].strip()


@pytest.mark.parametrize("args, machine, says", CASES)
def test_a_dry_run_refuses_what_the_real_command_refuses(tmp_path, machines, args, machine, says):
    real_dir, dry_dir = tmp_path / "real", tmp_path / "dry"
    real_dir.mkdir()
    dry_dir.mkdir()
    # both at once: two cores, and nothing either writes could reach the other's folder
    real = _start(args, real_dir, machines[machine])
    dry = _start([*args, "dry_run=true"], dry_dir, machines[machine])
    (_, real_err), (_, dry_err) = real.communicate(timeout=120), dry.communicate(timeout=120)
    assert real.returncode == 2, real_err[-2000:]
    assert says in _error(real_err), real_err[-2000:]
    assert dry.returncode == 2, dry_err[-2000:]
    assert _error(dry_err) == _error(real_err)
    for folder in (real_dir, dry_dir):  # no run folder, no .hydra, no outputs/: nothing at all
        assert not list(folder.iterdir()), (args, sorted(str(p) for p in folder.rglob("*")))


def test_a_dry_run_passes_where_the_real_checks_pass(tmp_path, machines):
    """The other side: a SLURM job prepared on a machine without GPUs is not refused (its GPUs are
    checked on the nodes), and the script shows the preset's CPUs and memory."""
    proc = _start(["launcher=slurm", "hardware=a100x8", "phase=sft", "dry_run=true"], tmp_path, machines["slurm_up"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=768GB"):
        assert line in out.splitlines(), (line, out[-3000:])
    assert not list(tmp_path.iterdir())


def test_a_refused_single_dry_run_still_shows_its_plan_and_script(tmp_path, machines):
    """Preparing a submission where SLURM is missing: the script is shown, and the refusal ends it."""
    proc = _start(["launcher=slurm", "hardware=a100x8", "phase=ppo", "dry_run=true"], tmp_path, machines["no_sbatch"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "launcher=slurm submits with sbatch, which is not on PATH" in err, err[-2000:]
    assert f"phase=ppo {PARENTS}" in err  # every problem at once
    assert "phase     : ppo" in out and "#SBATCH --cpus-per-task=8" in out and "#SBATCH --mem=768GB" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, cpus, mem", [
    ([], "8", "768GB"),  # the preset's
    (["launcher.cpus_per_task=4", "launcher.mem_gb=100"], "4", "100GB"),  # launcher.* wins
    (["hardware.cpus_per_task=2"], "2", "768GB"),
    (["launcher.cpus_per_task=null", "launcher.mem_gb=null"], None, None),  # the cluster's defaults
])
def test_sbatch_cpus_and_memory_come_from_the_preset_unless_the_launcher_sets_them(overrides, cpus, mem):
    from rlhf_exp.launch.slurm import compose_sbatch_script

    lines = compose_sbatch_script(["launcher=slurm", "hardware=a100x8", *overrides]).splitlines()
    assert [line for line in lines if line.startswith(("#SBATCH --cpus-per-task", "#SBATCH --mem"))] == \
        [f"#SBATCH --{k}={v}" for k, v in (("cpus-per-task", cpus), ("mem", mem)) if v is not None]
