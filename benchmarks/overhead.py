"""Framework overhead on the embedded SFT job, side by side: interleaved rounds (torch, trl, rlhf_exp, torch, trl,
rlhf_exp, ...), a fresh process per run (start-up and imports count), CPU time, wall time and peak RSS as ratios
taken round by round (benchmarks/harness.py); then the latency of the CLI's light paths, measured the same way.

    python benchmarks/overhead.py               # 3 rounds (~6 min on 2 cores)
    python benchmarks/overhead.py --reps 5
    python benchmarks/overhead.py --light-only  # the light paths alone (~10 s)

The job, in all three variants: the tiny Llama on the embedded sort task's 4,096 demonstrations, 10 epochs of
batches of 64 (64 steps an epoch, 640 steps unless early stopping ends it), AdamW lr 3e-3 constant, gradient
clipping 1.0, loss on the answer tokens only; the eval loss on the 256 held-out demonstrations after each epoch
(10 evaluations), the best epoch's weights kept (trl and rlhf_exp: early stopping after 2 epochs without
improvement, which does not fire in their runs); greedy gold evaluation on the 500 held-out prompts (8 new
tokens, batches of 256) before and after training. One thread per process
(OMP_NUM_THREADS=1). Each run prints its steps, eval loss and final gold score, so equal training shows.

  torch     the plain-PyTorch floor: benchmarks/floor_chain.py's SFT loop, with its helpers (setup, encoding,
            optimizer step, gold), run here (``--variant torch``). Differs: it always runs the 10 epochs (640
            steps) and keeps the best epoch without the early-stopping rule (with its own data order that rule
            ends it after epoch 9, 576 steps, while TRL's run goes the 10 epochs: the same steps matter more
            here); the data are tokenized once and padded to the longest sequence of the whole set (TRL pads
            per batch); the best epoch is kept as an in-memory copy (TRL writes a checkpoint each epoch and
            reloads the best); no final extra evaluation pass and no saved model.
  trl       benchmarks/bare_trl.py's ``sft`` (a bare SFTTrainer script with the tiny recipe's settings: per-epoch
            evaluation and checkpoints (2 kept), best-model reload, early stopping, one final evaluation, the
            model saved), plus the same two gold evaluations rlhf_exp makes (rlhf_exp.evaluation.gold_score), run
            by this file (``--variant trl``).
  rlhf_exp  ``python -m rlhf_exp`` (the README's first command): the same, plus its run machinery: composing
            and checking the config, the data preview, the run folder's files (manifest.json,
            metrics.jsonl, summary.json, samples_initial/final.jsonl with 50 gold samples each, config.yaml,
            .hydra/, launch/loading.json).

Baselines: rlhf_exp and trl against torch (the floor), and rlhf_exp against trl (what rlhf_exp adds to TRL).

Light paths (must not import the ML libraries): ``--help``, ``--cfg job``, and a PPO dry run with its memory plan
(``phase=ppo hardware=a100x8 model=llama3_8b dry_run=true``), interleaved the same way, as ratios to ``--cfg job``
(the dry run adds the config checks and the planner to composing the config). On a machine without GPUs, or
without an SFT run of that model, the dry run ends refused (exit 2) after printing its plan; that is counted as a
finished run when the plan was printed (the refusal comes after the plan). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
DRY_RUN = ["phase=ppo", "hardware=a100x8", "model=llama3_8b", "dry_run=true"]


# ------------------------------------------------------------------------------------------ the variants' bodies
def variant_torch() -> dict:
    """floor_chain's SFT loop (its helpers, the same encoding), all 10 epochs: see the module's docstring."""
    import copy

    import floor_chain as fc
    import torch

    torch.set_num_threads(1)
    _, data, tokenizer, model = fc.setup()
    prompts = list(data["eval_prompts"])
    initial = fc.gold(model, tokenizer, prompts)

    def encode(rows):  # as floor_chain.sft: prompt + completion + EOS, loss on the answer tokens
        full = [tokenizer(r["prompt"] + r["completion"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
        ids, mask = fc.pad_right(full, tokenizer.pad_token_id)
        labels = ids.masked_fill(~mask, -100)
        for i, r in enumerate(rows):
            labels[i, :len(tokenizer(r["prompt"])["input_ids"])] = -100
        return ids, mask, labels

    train, held = encode(data["sft_train"]), encode(data["sft_eval"])
    optimizer = fc.opt(model.parameters(), fc.LR["sft"])
    best, best_loss, steps = None, float("inf"), 0
    for _ in range(10):
        model.train()
        for idx in torch.randperm(len(train[0])).split(64):
            fc.step(optimizer, list(model.parameters()),
                    model(input_ids=train[0][idx], attention_mask=train[1][idx], labels=train[2][idx]).loss)
            steps += 1
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=held[0], attention_mask=held[1], labels=held[2]).loss.item()
        if loss < best_loss:
            best, best_loss = copy.deepcopy(model.state_dict()), loss
    model.load_state_dict(best)
    return {"steps": steps, "eval_loss": best_loss, "gold_initial": initial, "gold": fc.gold(model, tokenizer, prompts)}


def variant_trl(out: str) -> dict:
    import bare_trl
    from transformers import set_seed

    from rlhf_exp.evaluation import gold_score
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    set_seed(0)  # as bare_trl.main
    prompts = list(bare_trl.data()["eval_prompts"])
    tokenizer = build_tiny_tokenizer()
    # the starting model: build_tiny_model gives the same weights each time and leaves the RNG untouched
    initial = gold_score(build_tiny_model(bare_trl.defaults().model, tokenizer), tokenizer, prompts, 8, 256)
    trainers = []
    plain_finish = bare_trl.finish

    def finish(trainer, out_dir):
        trainers.append(trainer)
        return plain_finish(trainer, out_dir)

    bare_trl.finish = finish  # bare_trl.sft ends with finish(trainer, out): keep the trainer for the final gold
    result = bare_trl.sft(argparse.Namespace(out=out, sft=None))
    return {**result, "gold_initial": initial, "gold": gold_score(trainers[0].model, tokenizer, prompts, 8, 256)}


# ------------------------------------------------------------------------------------------ parsing the runs
def last_json(text: str, _tmp: Path) -> dict:
    r = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    return {k: r[k] for k in ("steps", "eval_loss", "gold")}


def ours(_text: str, tmp: Path) -> dict:
    (summary,) = Path(tmp).rglob("summary.json")
    m = json.loads(summary.read_text())["metrics"]
    return {"steps": m["steps"], "eval_loss": m["eval_loss"], "gold": m["gold_score"]}


def plan_printed(text: str, _tmp: Path) -> dict:
    if '"fits"' not in text:  # exit 2 without a plan is a real failure
        raise SystemExit(f"the dry run printed no plan; its output ends with:\n{text[-3000:]}")
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--light-only", action="store_true", help="only the CLI's light paths")
    ap.add_argument("--variant", choices=("torch", "trl"), help=argparse.SUPPRESS)  # one run's body (internal)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(variant_torch() if args.variant == "torch" else variant_trl(args.out)))
        return 0

    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process (OMP_NUM_THREADS=1); a fresh process per run\n", flush=True)
    if not args.light_only:
        print("== the SFT job: torch (plain PyTorch floor), trl (bare TRL script), rlhf_exp ==", flush=True)
        me = "benchmarks/overhead.py"
        results = interleaved([
            Variant("torch", python(me, "--variant", "torch"), ENV, last_json),
            Variant("trl", python(me, "--variant", "trl", "--out", "{tmp}"), ENV, last_json),
            Variant("rlhf_exp", python("-m", "rlhf_exp", "output_root={tmp}"), ENV, ours),
        ], reps=args.reps)
        floor = report(results, baseline="torch", extra=("steps", "eval_loss", "gold"))
        print()
        vs_trl = report({k: results[k] for k in ("trl", "rlhf_exp")}, baseline="trl")["rlhf_exp"]
        print("\nsummary (medians of the round-by-round ratios):")
        for name, m in (("rlhf_exp / torch", floor["rlhf_exp"]), ("trl / torch", floor["trl"]),
                        ("rlhf_exp / trl", vs_trl)):
            print(f"  {name:<17} CPU {m['cpu']:.3f}  wall {m['wall']:.3f}  peak RSS {m['rss_mb']:.3f}")
        print(flush=True)

    print("== the CLI's light paths (python -m rlhf_exp ...) ==", flush=True)
    light = interleaved([
        Variant("--help", python("-m", "rlhf_exp", "--help"), ENV),
        Variant("--cfg job", python("-m", "rlhf_exp", "--cfg", "job"), ENV),
        Variant("ppo dry run", python("-m", "rlhf_exp", *DRY_RUN, "output_root={tmp}"), ENV, plan_printed, (0, 2)),
    ], reps=args.reps)
    report(light, baseline="--cfg job")
    print(f"\nppo dry run = python -m rlhf_exp {' '.join(DRY_RUN)} (exit 0 or 2: refused after its plan, no GPU here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
