"""What a DPO run on a real-layout preference file costs when an earlier run on the same data left its work behind,
as sweep jobs and reruns do: the data checks' report (``rlhf_exp.data.check.reused_checks``) and TRL's tokenised
data set (datasets' cache), against the same run without the check's report, and against a first run.

    python benchmarks/data_reuse.py                   # 20,000 HH-RLHF-layout pairs, 3 rounds
    python benchmarks/data_reuse.py --rows 5000 --reps 5

Set-up, once, in a temporary folder: a scaled-down Llama 3.1 built from config (``rlhf_exp.scaled_models``: its
architecture and chat template, a 1,024-token vocabulary), a JSON Lines file in Anthropic/hh-rlhf's layout (two
transcripts per row sharing every turn but the last, 1-3 turns of varied length), the SFT parent run, and one DPO
run that fills a "warm" datasets cache. Then interleaved rounds of three variants, each a fresh
``python -m rlhf_exp phase=dpo phase.max_steps=1`` on the file (one thread):

* ``first``: an empty datasets cache (``HF_DATASETS_CACHE`` a new folder): the file read, converted, tokenised by
  TRL and checked, as the first run on a data set does;
* ``no_report``: the warm cache less the data checks' reports: what a sweep job cost before reports were kept
  (TRL's tokenisation was already reused through datasets' cache; every row was checked again);
* ``reused``: the warm cache: the report and the tokenised data read back.

Besides wall, CPU and peak RSS of the whole process, each run's ``summary.json`` timings give the CPU seconds of its
``data_check``, ``data`` (reading and converting the file) and ``setup`` (TRL's trainer, tokenising the data)
stages, its eval loss after the step and its data check counts (``data.train.check``), both of which must be
the same in every run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Variant, header, interleaved, python, report  # noqa: E402

TOPICS = ("the ocean", "baking bread", "chess openings", "tax forms", "tomato plants", "bicycle repair",
          "the moon", "learning French", "jazz records", "saving money", "running shoes", "old castles")


def hh_rows(n: int, seed: int = 0) -> list[dict]:
    """Anthropic/hh-rlhf's layout, with the lengths varied: 1-3 turns, answers of 3-60 words."""
    rng = random.Random(seed)
    words = "the a of to and in is it that for on with as was at by this be from or have an they which one".split()

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        context = f"\n\nHuman: Tell me about {topic}. ({i})"
        for _ in range(rng.randint(0, 2)):
            context += f"\n\nAssistant: {say(rng.randint(3, 40))}\n\nHuman: {say(rng.randint(3, 20))}"
        rows.append({"chosen": f"{context}\n\nAssistant: {say(rng.randint(5, 60))} {topic}.",
                     "rejected": f"{context}\n\nAssistant: {say(rng.randint(3, 30))}"})
    return rows


def parse(_text: str, tmp: Path) -> dict:
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    t = summary["timings"]
    cpu = lambda k: t.get(k, {}).get("cpu_s", 0.0)  # noqa: E731
    return {"data_check_cpu": cpu("data_check"), "data_cpu": cpu("data"), "setup_cpu": cpu("setup"),
            "eval_loss": summary["metrics"]["eval_loss"],
            "check": json.dumps(summary["data"]["train"]["check"], sort_keys=True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", help="a folder to build in and keep (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    print(header())
    work = Path(args.keep or tempfile.mkdtemp(prefix="rlhf_data_reuse_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        sys.path.insert(0, str(ROOT))
        from tests.scaled_fixtures import build_cached

        model = build_cached(work / "models", "llama3_1")
        data = work / "hh.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in hh_rows(args.rows)))
        warm = work / "warm_cache"
        common = ["model=local", f"model.path={model}", "data=hh_rlhf", f"data.path={data}",
                  "data.max_eval_samples=64", f"output_root={work / 'outputs'}"]
        env = {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(warm)}
        print(f"rounds: {args.reps}; threads: 1 per process; {args.rows} pairs in {data.name} "
              f"({data.stat().st_size / 1e6:.1f} MB); the scaled Llama 3.1 at {model.name}")
        for phase in ("sft", "dpo"):  # the parent, then one DPO run to warm the cache
            proc = subprocess.run(python("-m", "rlhf_exp", *common, f"phase={phase}", "phase.max_steps=1"),
                                  cwd=ROOT, env={**__import__("os").environ, **env}, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"set-up {phase} run failed:\n{proc.stderr[-3000:]}")
        dpo = python("-m", "rlhf_exp", *common, "phase=dpo", "phase.max_steps=1", "hydra.run.dir={tmp}/run")
        # the harness gives each run a fresh folder through its arguments: the shell puts an empty cache there
        first = ["sh", "-c", 'HF_DATASETS_CACHE="$0/hf_datasets" exec "$@"', "{tmp}", *dpo]
        no_report = ["sh", "-c", f'rm -rf "{warm}/rlhf_exp_data_check" && exec "$0" "$@"', *dpo]
        print()
        results = interleaved([Variant("first", first, env, parse=parse),
                               Variant("no_report", no_report, env, parse=parse),
                               Variant("reused", dpo, env, parse=parse)], reps=args.reps)
        report(results, baseline="no_report", extra=("data_check_cpu", "data_cpu", "setup_cpu"))
        losses = {r["eval_loss"] for runs in results.values() for r in runs}
        checks = {r["check"] for runs in results.values() for r in runs}
        print(f"\nthe same eval loss after the step in every run: {'yes' if len(losses) == 1 else 'NO: ' + str(losses)}"
              f"; the same data check counts in every summary: {'yes' if len(checks) == 1 else 'NO'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
