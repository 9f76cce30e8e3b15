"""What each way of launching costs, on the same small SFT job, side by side: interleaved rounds (local, cpu_x2,
submitit_local, [slurm, slurm_x2], local, ...), a fresh process per run, CPU time, wall time and peak RSS as ratios
to ``local`` taken round by round (benchmarks/harness.py).

    python benchmarks/launchers.py            # 3 rounds (~5 min on 2 cores; ~9 with the SLURM rows)
    python benchmarks/launchers.py --reps 5 --steps 100

The job: ``python -m rlhf_exp`` (the embedded SFT task, tiny recipe) cut to 200 steps (``--steps``), global batch
64, logging every 50 steps, one thread per process (OMP_NUM_THREADS=1); with 200 steps it ends inside the 4th
epoch, so 3 per-epoch evaluations, the final evaluation and the gold evaluation before and after, in every
variant:

  local            one process (the default)
  cpu_x2           two processes on this machine (torchrun, gloo), per-process batch 32: the same global batch
  submitit_local   submitit's code path (pickled Hydra job), one task
  slurm            submitted to SLURM and waited for (only when ``sinfo`` answers with an idle node)
  slurm_x2         two SLURM tasks forming one gloo process group

On a 2-core machine two processes share the cores, so ``cpu_x2`` measures the machinery, not a speed-up.

CPU time and peak RSS are those of the command's process tree (os.wait4's rusage: the process and the children it
waited for). A SLURM job runs under slurmd, outside that tree: for the slurm rows the rusage holds only the
submitting command (composing, submitting, polling). Their CPU is reported as that plus the job's own TotalCPU
from ``sacct`` (all its steps; the job id is read from the run's manifest.json), or "n/a" when sacct has no
number; their peak RSS is "n/a" (the job's processes are not in the tree, and sacct's MaxRSS is sampled,
JobAcctGatherFrequency, and came back empty for some of these short jobs on the test cluster); the submitting
command's own CPU and RSS are printed as ``client_cpu`` and ``client_rss_mb``. Wall time is the command's,
submission to the end of the wait, for every row.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
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
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and "idle" in probe.stdout


def summary(_text: str, tmp: Path) -> dict:
    (path,) = Path(tmp).rglob("summary.json")
    m = json.loads(path.read_text())["metrics"]
    return {"procs": m["num_processes"], "steps": m["steps"], "loss": m["train_loss_last"], "gold": m["gold_score"]}


def seconds(text: str) -> float:
    """sacct's [DD-]HH:MM:SS(.fff) or MM:SS.fff as seconds."""
    days, _, rest = text.strip().rpartition("-")
    total = 0.0
    for part in rest.split(":"):
        total = total * 60 + float(part)
    return total + 86400 * int(days or 0)


def job_cpu(job_id: str) -> float | None:
    """TotalCPU of the whole SLURM job from sacct: the job's own line, which sums its steps (the batch script and
    the srun step with the run; the allocation-only line, ``-X``, carries none). None when sacct has no number.
    Accounting is written as the job ends, so this retries for a few seconds."""
    for _ in range(20):
        proc = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,TotalCPU"],
                              capture_output=True, text=True)
        rows = {r[0]: r[1:] for r in (ln.split("|") for ln in proc.stdout.splitlines()) if len(r) == 3}
        state, total = rows.get(job_id, ("", ""))
        if proc.returncode == 0 and state.startswith("COMPLETED") and total.strip():
            value = seconds(total)
            if value > 0:
                return value
        time.sleep(0.5)
    return None


def slurm_summary(text: str, tmp: Path) -> dict:
    """summary() and the job's TotalCPU (job id from the run's manifest.json)."""
    ids = set()
    for manifest in Path(tmp).rglob("manifest.json"):
        job = (json.loads(manifest.read_text()).get("slurm") or {}).get("job_id")
        if job:
            ids.add(job)
    cpu = job_cpu(ids.pop()) if len(ids) == 1 else None
    return {**summary(text, tmp), "job_cpu": cpu}


def outside_tree(r: dict) -> None:
    """A SLURM row: the rusage is the submitting command's; CPU becomes that + the job's TotalCPU (None when sacct
    had none), peak RSS not measured."""
    r["client_cpu"], r["client_rss_mb"] = r["cpu"], r["rss_mb"]
    r["cpu"] = None if r.get("job_cpu") is None else r["cpu"] + r["job_cpu"]
    r["rss_mb"] = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the job (default 200)")
    ap.add_argument("--no-slurm", action="store_true", help="leave out the SLURM rows even when a cluster answers")
    args = ap.parse_args(argv)
    slurm = not args.no_slurm and slurm_up()
    names = [n for n in VARIANTS if slurm or not n.startswith("slurm")]
    job = [f"phase.max_steps={args.steps}", "phase.logging_steps=50"]

    print(header())
    print(f"rounds: {args.reps}; job: python -m rlhf_exp {' '.join(job)}; threads: 1 per process; "
          "a fresh process per run")
    print("SLURM rows: " + ("wall = the submitting command's, submission to the end of the wait; CPU = its rusage + "
                            "the job's TotalCPU from sacct (the job runs under slurmd, outside our process tree: "
                            "wait4 does not see it); peak RSS n/a" if slurm else
                            "skipped (no cluster answered sinfo, or --no-slurm)") + "\n", flush=True)
    variants = []
    for n in names:
        cmd = python("-m", "rlhf_exp", *job, *VARIANTS[n], "output_root={tmp}")
        if n.startswith("slurm"):
            variants.append(Variant(n, cmd, ENV, slurm_summary, finish=outside_tree))
        else:
            variants.append(Variant(n, cmd, ENV, summary))
    results = interleaved(variants, reps=args.reps)
    report(results, baseline="local", extra=("procs", "steps", "loss", "gold"))
    if slurm:
        print("\nSLURM rows, round by round: the submitting command's own rusage (CPU s, peak RSS MB) and the job's "
              "TotalCPU (sacct)")
        for n in names:
            if n.startswith("slurm"):
                print(f"  {n:<9} " + "; ".join(
                    f"client {r['client_cpu']:.2f} s {r['client_rss_mb']:.0f} MB, job "
                    + ("n/a" if r["job_cpu"] is None else f"{r['job_cpu']:.2f} s") for r in results[n]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
