"""What each way of launching costs, on the same small SFT job, measured side by side in one run.

    python benchmarks/launchers.py           # ~2-3 minutes on 2 CPU cores; SLURM rows need a cluster

The job: the embedded SFT task, 200 steps, 1 gold evaluation. Each variant runs `python -m rlhf_exp`
in a fresh process, so start-up and imports count:

  local            one process (the default)
  cpu_x2           two processes on this machine (torchrun, gloo), per-process batch halved: same
                   global batch, same result
  submitit_local   submitit's code path (pickled Hydra job), one task
  slurm            submitted to SLURM and waited for (only when `sinfo` answers)
  slurm_x2         two SLURM tasks forming one gloo process group

It prints wall times, gold scores and ratios to `local`; nothing is asserted. On a 2-core machine two
processes share the cores, so `cpu_x2` measures the machinery, not a speed-up.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ["phase.max_steps=200", "phase.logging_steps=50"]
VARIANTS = {
    "local": ["phase.per_device_train_batch_size=64"],
    "cpu_x2": ["hardware=cpu_x2", "phase.per_device_train_batch_size=32"],
    "submitit_local": ["launcher=submitit_local", "phase.per_device_train_batch_size=64"],
    "slurm": ["launcher=slurm", "phase.per_device_train_batch_size=64"],
    "slurm_x2": ["launcher=slurm", "hardware=cpu_x2", "phase.per_device_train_batch_size=32"],
}


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return probe.returncode == 0 and "idle" in probe.stdout


def run(name: str, args: list[str], root: Path) -> dict:
    out = root / name
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp", *JOB, *args, f"output_root={out}"], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    (summary,) = out.rglob("summary.json")
    metrics = json.loads(summary.read_text())["metrics"]
    return {"wall": wall, "train": metrics["train_runtime_s"], "gold": metrics["gold_score"],
            "procs": metrics["num_processes"], "loss": metrics["train_loss_last"]}


def main() -> None:
    names = [n for n in VARIANTS if not n.startswith("slurm") or slurm_up()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run(name, VARIANTS[name], Path(tmp))
    import torch

    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} CPU cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}"
          + ("" if "slurm" in names else "; SLURM rows skipped: no cluster answered"))
    print(f"\n{'variant':<16}{'procs':>6}{'wall s':>9}{'train s':>9}{'last loss':>11}{'gold':>8}{'wall / local':>14}")
    for name, r in results.items():
        print(f"{name:<16}{r['procs']:>6}{r['wall']:>9.1f}{r['train']:>9.1f}{r['loss']:>11.5f}{r['gold']:>8.3f}"
              f"{r['wall'] / results['local']['wall']:>14.2f}")


if __name__ == "__main__":
    main()
