"""The README's main command against the plain-PyTorch floor of the same chain, side by side: interleaved rounds,
fresh processes, CPU time, wall time and peak RSS as ratios round by round (benchmarks/harness.py).

    python benchmarks/chain.py              # 3 rounds (~9 min on 2 cores)
    python benchmarks/chain.py --reps 5

rlhf_exp: ``python -m rlhf_exp pipeline=rlhf`` (SFT, RM, PPO, DPO: four phase processes forked from one process
that imported the ML libraries once, pipeline.preload); rlhf_exp_fresh: the same with ``pipeline.preload=false``
(a fresh process per phase, each importing them). floor: benchmarks/floor_chain.py, the same four phases' training
and evaluations as plain PyTorch loops in one process (its docstring lists what it leaves out). One thread per
process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def ours(text: str, tmp: Path) -> dict:
    (summary,) = Path(tmp).rglob("pipeline_summary.json")
    rows = {r["phase"]: r.get("metrics", {}) for r in json.loads(summary.read_text())["phases"]}
    return {"ppo_gold": rows["ppo"].get("gold") or 0.0}


def floor(text: str, _tmp: Path) -> dict:
    r = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    return {"ppo_gold": r["ppo"]["gold"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process\n", flush=True)
    command = python("-m", "rlhf_exp", "pipeline=rlhf", "output_root={tmp}")
    results = interleaved([Variant("rlhf_exp", command, ENV, ours),
                           Variant("rlhf_exp_fresh", [*command, "pipeline.preload=false"], ENV, ours),
                           Variant("floor", python("benchmarks/floor_chain.py"), ENV, floor)], reps=args.reps)
    medians = report(results, baseline="floor")
    for name in ("rlhf_exp", "rlhf_exp_fresh"):
        m = medians[name]
        print(f"\nsummary: {name} / the plain-PyTorch floor: CPU {m['cpu']:.3f}, wall {m['wall']:.3f}, "
              f"peak RSS {m['rss_mb']:.3f} (medians of the round-by-round ratios)")
    report({k: results[k] for k in ("rlhf_exp", "rlhf_exp_fresh")}, baseline="rlhf_exp_fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
