"""Each TRL-backed phase of the embedded task through rlhf_exp against a bare TRL script doing the same training,
side by side: interleaved rounds (rlhf_exp, bare, rlhf_exp, bare, ...), fresh processes, CPU time, wall time and
peak RSS as ratios round by round (benchmarks/harness.py).

    python benchmarks/phases.py                    # sft, rm, dpo; 3 rounds (~6 min on 2 cores)
    python benchmarks/phases.py --phases dpo --reps 5

rlhf_exp: ``python -m rlhf_exp phase=<phase>`` with the tiny recipe, as the README runs it (RM and DPO from one
SFT run made first). bare: benchmarks/bare_trl.py, the same trainer settings, model, data, evaluation and
best-model rules, then one final evaluation and the saved model, without rlhf_exp's run machinery. Both on one
thread (OMP_NUM_THREADS=1: the rule rlhf_exp applies to this model by itself).

rlhf_exp does more than the bare script in the same command, which the ratios include: the gold evaluation
before and after training (greedy answers to 500 held-out prompts), the preference-data checks (RM, DPO),
DPO's held-out evaluation every 32 steps (generation, KL, self-BLEU), a data preview, the run folder's files.
``--same-work`` turns off what can be turned off (DPO's held-out evaluation: phase.eval_num_prompts=0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def sft_checkpoint(folder: Path) -> Path:
    proc = subprocess.run(python("-m", "rlhf_exp", f"output_root={folder}"), cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, **ENV})
    if proc.returncode != 0:
        raise SystemExit("the SFT parent run failed:\n" + proc.stderr[-3000:])
    (run,) = (folder / "runs").iterdir()
    return run


def last_json(text: str, _tmp: Path) -> dict:
    line = [ln for ln in text.splitlines() if ln.startswith("{")][-1]
    return {k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))}


def ours_summary(text: str, tmp: Path) -> dict:
    (summary,) = Path(tmp).rglob("summary.json")
    metrics = json.loads(summary.read_text())["metrics"]
    return {k: metrics[k] for k in ("steps", "eval_loss") if k in metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="sft,rm,dpo")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--same-work", action="store_true", help="turn off rlhf_exp's extra evaluations where possible")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process; --same-work: {args.same_work}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_parent_") as parent:
        sft = sft_checkpoint(Path(parent)) if {"rm", "dpo"} & set(phases) else None
        medians = {}
        for phase in phases:
            print(f"== {phase} ==", flush=True)
            extra = [f"phase.sft_run={sft}"] if phase != "sft" else []
            if args.same_work and phase == "dpo":
                extra.append("phase.eval_num_prompts=0")
            bare = ["--sft", str(sft / "checkpoints" / "final")] if phase != "sft" else []
            variants = [
                Variant("rlhf_exp", python("-m", "rlhf_exp", f"phase={phase}", *extra, "output_root={tmp}"), ENV,
                        ours_summary),
                Variant("bare_trl", python("benchmarks/bare_trl.py", phase, *bare, "--out", "{tmp}"), ENV, last_json),
            ]
            results = interleaved(variants, reps=args.reps)
            medians[phase] = report(results, baseline="bare_trl")["rlhf_exp"]
            print(flush=True)
    print("summary: rlhf_exp / bare TRL, median of the round-by-round ratios")
    for phase, m in medians.items():
        print(f"  {phase:<4} CPU {m['cpu']:.3f}  wall {m['wall']:.3f}  peak RSS {m['rss_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
