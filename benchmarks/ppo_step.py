"""Where a PPO step's time goes, and what a change to the PPO loop saves, side by side.

    python benchmarks/ppo_step.py                              # breakdown at both sizes, 3 rounds
    python benchmarks/ppo_step.py --compare 4c26b28            # this tree against commit 4c26b28, interleaved
    python benchmarks/ppo_step.py --sizes 6m --reps 5

Every PPO step logs its stages' wall seconds in metrics.jsonl (``time/generate``, ``time/policy_forward``,
``time/reference_forward``, ``time/value_forward``, ``time/reward_forward``, ``time/update``, ``time/step``;
rlhf_exp.ppo.trainer.StageTimer). For each size (``tiny``: the embedded model, 83k parameters; ``6m``: the same Llama
with hidden 256, 6 layers, MLP 1024, 6.3M parameters, as in benchmarks/ppo_vs_trl.py, whose parents it reuses:
SFT, then a reward model from it, made with rlhf_exp first), the benchmark runs ``phase=ppo`` (the tiny recipe: 128
answers of at most 8 tokens, 2 epochs of 2 mini-batches; no held-out evaluation during training) in fresh
processes, and prints each stage's median seconds per step and its share of the step.

With ``--compare REV`` the same run from a ``git worktree`` of REV (made in a temporary folder, removed after)
is the second variant, interleaved with this tree's (A B A B): whole-command wall/CPU/peak RSS ratios round by
round (benchmarks/harness.py), the training loop's seconds per step, and, when REV logs them too, the stages
side by side. Stdlib and git only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Variant, header, interleaved, python, report  # noqa: E402
from ppo_vs_trl import SIZES, parents  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
STAGES = ("generate", "policy_forward", "reference_forward", "value_forward", "reward_forward", "update")


def numbers(text: str, tmp: Path) -> dict:
    """Seconds per training step, and the stages' median seconds per step (a dict: not printed per round)."""
    (summary,) = Path(tmp).rglob("summary.json")
    m = json.loads(summary.read_text())["metrics"]
    rows = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "ppo/kl" in r]
    stages = {k[5:]: statistics.median(r[k] for r in steps) for k in steps[-1] if k.startswith("time/")}
    return {"s_per_step": m["train_runtime_s"] / m["steps"], "stages": stages}


def command(tree: Path, args: list[str]) -> list[str]:
    """``python -m rlhf_exp args`` run in ``tree`` (its own package and conf/)."""
    line = " ".join(shlex.quote(a) for a in python("-m", "rlhf_exp", *args))
    return ["bash", "-c", f"cd {shlex.quote(str(tree))} && exec {line}"]


def breakdown(results: dict) -> None:
    names = list(results)
    stages = list(dict.fromkeys(s for runs in results.values() for r in runs for s in r["stages"]))
    if not stages:
        return
    print("\nstage seconds per step, median over steps, then over rounds (share of time/step)")
    print(f"{'stage':<20}" + "".join(f"{n:>24}" for n in names))
    for stage in [*[s for s in STAGES if s in stages], *[s for s in stages if s not in STAGES]]:
        cells = []
        for name in names:
            runs = [r for r in results[name] if stage in r["stages"]]
            if not runs:
                cells.append(f"{'-':>24}")
                continue
            value = statistics.median(r["stages"][stage] for r in runs)
            step = statistics.median(r["stages"]["step"] for r in runs)
            cells.append(f"{value:>14.4f} ({value / step:5.1%})")
        print(f"{stage:<20}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,6m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", metavar="REV", help="also run a git worktree of this commit, interleaved")
    args = ap.parse_args(argv)
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process" + (f"; against {args.compare}" if args.compare else "") + "\n",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_step_") as tmp:
        base = None
        if args.compare:
            base = Path(tmp) / "base"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.compare],
                           check=True)
        try:
            for size in [s for s in args.sizes.split(",") if s]:
                spec = SIZES[size]
                sft, rm, _ = parents(size, Path(tmp))
                print(f"== {size}: {spec['steps']} PPO steps (parents {sft.name}, {rm.name}) ==", flush=True)
                ppo = ["phase=ppo", *spec["model"], f"phase.sft_run={sft}", f"phase.reward_run={rm}",
                       f"phase.max_steps={spec['steps']}", "phase.eval_steps=null", "output_root={tmp}"]
                variants = [Variant("this tree", command(ROOT, ppo), ENV, numbers)]
                if base is not None:
                    variants.append(Variant(args.compare, command(base, ppo), ENV, numbers))
                results = interleaved(variants, reps=args.reps)
                if base is not None:
                    report(results, baseline=args.compare, extra=("s_per_step",))
                    ratios = [a["s_per_step"] / b["s_per_step"] for a, b in zip(results["this tree"],
                                                                                 results[args.compare])]
                    print(f"s per step: this tree / {args.compare} round by round: "
                          f"{' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
                breakdown(results)
                print(flush=True)
        finally:
            if base is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
