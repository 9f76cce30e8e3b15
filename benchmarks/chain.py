"""The README's main command against the plain-PyTorch floor of the same chain, side by side: interleaved rounds,
fresh processes, CPU time, wall time and peak RSS as ratios round by round (benchmarks/harness.py).

    python benchmarks/chain.py              # 3 rounds (~9 min on 2 cores)
    python benchmarks/chain.py --reps 5

rlhf_exp: ``python -m rlhf_exp pipeline=rlhf`` (SFT, RM, PPO, DPO: four phase processes forked from one process
that imported the ML libraries once, pipeline.preload), a first run: datasets' cache empty; rlhf_exp_rerun: the
same command again, as a rerun or a sweep job runs it: datasets' cache holds what an earlier run of the chain kept
there (the data sets TRL's trainers tokenised, rlhf_exp.data.loading.on_disk; the cache is filled once before the
rounds); rlhf_exp_fresh: a first run with ``pipeline.preload=false`` (a fresh process per phase, each importing
them). floor: benchmarks/floor_chain.py, the same four phases' training
and evaluations as plain PyTorch loops in one process (its docstring lists what it leaves out). One thread per
process.

After the ratios, a breakdown of the CPU seconds by phase and part, medians over the rounds: for rlhf_exp from each
phase's summary.json "timings" (rlhf_exp.tracking.run.Run.stage) and the pipeline's own process (the rest of the
measured total: the pipeline, and with preload its pre-imported process, imports included), for the floor from
its printout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def ours(text: str, tmp: Path) -> dict:
    """PPO's gold, and CPU seconds by phase and part: start (the phase process before its run folder opened, and
    its imports: none new under preload), data (reading or building the phase's data), train loop (the trainer's
    loop, less its evaluations), evaluations (the trainer's evaluations during and after training, DPO's held-out
    evaluations, the RM's held-out score statistics), gold (gold evaluations before and after), save (the final
    model), models (loading them), setup (building the trainer: TRL's tokenisation of the data, wrapping; PPO's
    backend and rollout engine), other (the tokenizer, data previews, files); data includes the RM/DPO data checks
    (data_check)."""
    (summary,) = Path(tmp).rglob("pipeline_summary.json")
    phases = json.loads(summary.read_text())["phases"]
    rows = {r["phase"]: r.get("metrics", {}) for r in phases}
    parts: dict[str, float] = {}
    for row in phases:
        t = json.loads((Path(row["path"]) / "summary.json").read_text())["timings"]

        def cpu(name: str, t: dict = t) -> float:
            return t.get(name, {}).get("cpu_s", 0.0)

        phase = row["phase"]
        parts[f"{phase} start"] = cpu("before_run") + cpu("imports")
        parts[f"{phase} data"] = cpu("data") + cpu("data_check")
        parts[f"{phase} models"] = cpu("models")
        parts[f"{phase} setup"] = cpu("setup")
        evals = cpu("train/evaluate") + cpu("train/heldout_eval") + cpu("evaluate") + cpu("reward_stats")
        parts[f"{phase} train loop"] = cpu("train") - cpu("train/evaluate") - cpu("train/heldout_eval")
        parts[f"{phase} evaluations"] = evals
        parts[f"{phase} gold"] = cpu("gold_initial") + cpu("gold_final")
        parts[f"{phase} save"] = cpu("save")
        parts[f"{phase} other"] = cpu("total") + cpu("before_run") - sum(v for k, v in parts.items()
                                                                          if k.startswith(f"{phase} "))
    return {"ppo_gold": rows["ppo"].get("gold") or 0.0, "parts": parts}


def floor(text: str, _tmp: Path) -> dict:
    r = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    c = r["cpu"]
    parts = {"setup start": c["imports"] + c["setup"]}
    for phase in ("sft", "rm", "ppo", "dpo"):
        parts[f"{phase} gold"] = c.get(f"{phase}_gold", 0.0)
        parts[f"{phase} train loop"] = c[phase] - parts[f"{phase} gold"]
    return {"ppo_gold": r["ppo"]["gold"], "parts": parts}


def breakdown(results: dict) -> None:
    """CPU seconds by phase and part, medians over the rounds; the pipeline's own process is the measured total
    less its phases."""
    for runs in results.values():
        for r in runs:
            r["parts"]["pipeline process"] = r["cpu"] - sum(r["parts"].values())
    names = list(results)
    keys = list(dict.fromkeys(k for runs in results.values() for r in runs for k in r["parts"]))
    print("\nCPU seconds by phase and part, medians over the rounds (floor: each phase's loop includes its "
          "in-training evaluations; its imports, data and model building are one part, 'setup start')")
    print(f"{'part':<20}" + "".join(f"{n:>16}" for n in names))
    for key in keys:
        cells = [statistics.median(r["parts"].get(key, 0.0) for r in results[n]) for n in names]
        print(f"{key:<20}" + "".join(f"{c:>16.2f}" for c in cells))
    print(f"{'total (measured)':<20}" + "".join(f"{statistics.median(r['cpu'] for r in results[n]):>16.2f}"
                                                for n in names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-fresh", action="store_true", help="leave out rlhf_exp_fresh (preload off)")
    ap.add_argument("--no-rerun", action="store_true", help="leave out rlhf_exp_rerun (datasets' cache warm)")
    args = ap.parse_args(argv)
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process\n", flush=True)
    command = python("-m", "rlhf_exp", "pipeline=rlhf", "output_root={tmp}")
    # a first run: datasets' cache empty (a new folder per run, in the run's temporary folder)
    first = ["sh", "-c", 'HF_DATASETS_CACHE="$0/hf_datasets" exec "$@"', "{tmp}"]
    warm = tempfile.mkdtemp(prefix="rlhf_chain_cache_")
    variants = [Variant("rlhf_exp", [*first, *command], ENV, ours),
                Variant("rlhf_exp_rerun", command, {**ENV, "HF_DATASETS_CACHE": warm}, ours),
                Variant("rlhf_exp_fresh", [*first, *command, "pipeline.preload=false"], ENV, ours),
                Variant("floor", python("benchmarks/floor_chain.py"), ENV, floor)]
    if args.no_fresh:
        variants = [v for v in variants if v.name != "rlhf_exp_fresh"]
    if args.no_rerun:
        variants = [v for v in variants if v.name != "rlhf_exp_rerun"]
    else:  # what a rerun or a sweep job finds: the data sets TRL tokenised kept by an earlier run of the chain
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([a.replace("{tmp}", out) for a in command], env={**os.environ, **ENV, "HF_DATASETS_CACHE": warm},
                           check=True, capture_output=True)
    results = interleaved(variants, reps=args.reps)
    medians = report(results, baseline="floor")
    for name in [v.name for v in variants if v.name != "floor"]:
        m = medians[name]
        print(f"\nsummary: {name} / the plain-PyTorch floor: CPU {m['cpu']:.3f}, wall {m['wall']:.3f}, "
              f"peak RSS {m['rss_mb']:.3f} (medians of the round-by-round ratios)")
    if not args.no_fresh:
        report({k: results[k] for k in ("rlhf_exp", "rlhf_exp_fresh")}, baseline="rlhf_exp_fresh")
    if not args.no_rerun:
        report({k: results[k] for k in ("rlhf_exp", "rlhf_exp_rerun")}, baseline="rlhf_exp")
        shutil.rmtree(warm, ignore_errors=True)
    breakdown(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
