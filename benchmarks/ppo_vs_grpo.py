"""rlhf_exp's PPO against TRL 1.16's GRPOTrainer and RLOOTrainer on equal generated tokens and optimizer updates, at
two model sizes, side by side: interleaved rounds, fresh processes, CPU time, wall time, peak RSS, and the training
loop's seconds per step (one generation round of 128 answers and its updates) (benchmarks/harness.py).

    python benchmarks/ppo_vs_grpo.py                      # both sizes, 3 rounds
    python benchmarks/ppo_vs_grpo.py --sizes tiny --reps 1
    python benchmarks/ppo_vs_grpo.py --sizes 6m --steps 6m=5   # fewer steps for a size (printed in the header)

Everything runs in the project's environment (trl 1.16). Sizes, parents and the rlhf_exp command are those of
benchmarks/ppo_vs_trl.py (imported from it): ``tiny`` (the embedded model, 83k parameters, 40 steps) and ``6m``
(hidden 256, 6 layers, MLP 1024: 6.3M parameters, 10 steps). For each size the parents are made first with rlhf_exp
(SFT, then a reward model from it), then all three variants get the same SFT checkpoint (policy, reference),
reward-model checkpoint and prompts (the preference set's distinct prompts). The three variants run in turn, round
after round:

- ``rlhf_exp``: ``python -m rlhf_exp phase=ppo <size's model overrides> phase.sft_run=<sft> phase.reward_run=<rm>
  phase.max_steps=<steps> phase.kl_ctrl=fixed phase.kl_coef=0.05 phase.eval_steps=null phase.num_mini_batches=1
  output_root=<tmp>``
- ``trl_grpo`` / ``trl_rloo``: ``python benchmarks/trl116_grpo_rloo.py --trainer grpo|rloo --sft
  <sft>/checkpoints/final --rm <rm>/checkpoints/reward_model --prompts prompts.json --steps <steps> --out <tmp>``

Equal work per step: 128 answers of at most 8 new tokens at temperature 1 (rlhf_exp: 128 prompts; TRL: 16 prompts x
``num_generations=8``), then 2 optimizer updates, each over all 128 answers in one forward/backward (rlhf_exp:
``ppo_epochs=2`` x ``num_mini_batches=1``, tiny recipe ``micro_batch_size: null``; TRL: ``per_device_train_batch_size
=128, gradient_accumulation_steps=1, steps_per_generation=1`` (so ``generation_batch_size=128``),
``num_iterations=2``, ``max_steps = 2 x steps``), learning rate 1e-4 constant, clip 0.2, KL to the SFT model with
coefficient 0.05 (rlhf_exp and RLOO: k1 in the reward; GRPO: beta 0.05, k3 in the loss). The benchmark checks
the counts: every TRL run must report ``steps`` generation rounds (calls of ``_generate_and_score_completions``)
and ``2 x steps`` optimizer steps (``trainer.state.global_step``); rlhf_exp's run reports its steps and its config
(``ppo_epochs x num_mini_batches`` updates per step) in the run folder.

Differences that remain (their cost is in the ratios): GRPO and RLOO have no value model; rlhf_exp's PPO also
trains a critic (initialised from the reward model, its own optimizer) and runs its forwards and backwards at every
update, and computes GAE. rlhf_exp draws 128 prompts per step (uniformly, with replacement), TRL 16 prompts x 8
answers (the same number of generated sequences and at most the same tokens; answers stop at EOS in both).
rlhf_exp normalises and clips the reward-model score, scores the rollouts' gold reward, evaluates gold before and
after training (greedy answers to 500 prompts) and writes its run folder (checkpoint included); TRL writes nothing
and its timed part is ``trainer.train()`` only. TRL's reward model scores prompt + answer text without BOS and EOS
(``add_special_tokens=False``), rlhf_exp's ``tokenizer(prompt + answer + eos)`` (BOS added; rlhf_exp/data/encode.py).
Ratios are ``rlhf_exp / trl_grpo`` and ``rlhf_exp / trl_rloo`` (each TRL trainer is the baseline: below 1 means
rlhf_exp is cheaper), as in ppo_vs_trl.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402
from ppo_vs_trl import ENV, SIZES, ours_numbers, parents  # noqa: E402

TRAINERS = ("grpo", "rloo")
UPDATES_PER_STEP = 2  # ppo_epochs 2 x num_mini_batches 1


def ours_with_recipe(text: str, tmp: Path) -> dict:
    """ppo_vs_trl's numbers (steps, s_per_step) plus the optimizer updates per step the run's config implies."""
    numbers = ours_numbers(text, tmp)
    from omegaconf import OmegaConf

    (config,) = [p for p in Path(tmp).rglob("config.yaml") if p.parent.name != ".hydra"]
    phase = OmegaConf.load(config).phase
    numbers["updates"] = numbers["steps"] * phase.ppo_epochs * phase.num_mini_batches
    numbers["completions_per_step"] = phase.rollout_batch_size
    return numbers


def trl_numbers(text: str, _tmp: Path) -> dict:
    line = [ln for ln in text.splitlines() if ln.startswith("{")][-1]
    r = json.loads(line)
    return {k: r[k] for k in ("steps", "updates", "completions_per_step", "s_per_step")}


def check_equal_work(results: dict[str, list[dict]], steps: int) -> None:
    """Every run did ``steps`` rounds of 128 completions and UPDATES_PER_STEP updates each, or the benchmark stops."""
    for name, runs in results.items():
        for i, r in enumerate(runs):
            got = (r["steps"], r["updates"], r["completions_per_step"])
            if got != (steps, steps * UPDATES_PER_STEP, 128):
                raise SystemExit(f"unequal work: {name} round {i + 1} did (steps, updates, completions per step) "
                                 f"{got}, expected {(steps, steps * UPDATES_PER_STEP, 128)}")
    print(f"equal work checked: every run did {steps} steps of 128 completions, {steps * UPDATES_PER_STEP} optimizer "
          f"updates", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,6m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", default="", help="override steps per size, e.g. 6m=5,tiny=20 (default: SIZES)")
    args = ap.parse_args(argv)
    steps_of = {size: spec["steps"] for size, spec in SIZES.items()}
    steps_of.update({k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(",") if kv)})
    print(header())
    print(f"TRL GRPOTrainer / RLOOTrainer in this environment; rounds: {args.reps}; threads: 1 per process; steps "
          f"{', '.join(f'{s} {steps_of[s]}' for s in args.sizes.split(',') if s)}\n", flush=True)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="rlhf_bench_grpo_") as tmp:
        for size in [s for s in args.sizes.split(",") if s]:
            spec = SIZES[size]
            sft, rm, prompts = parents(size, Path(tmp))
            steps = steps_of[size]
            print(f"== {size}: {steps} steps of 128 answers, {UPDATES_PER_STEP} updates each (parents {sft.name}, "
                  f"{rm.name}) ==", flush=True)
            ours = ["-m", "rlhf_exp", "phase=ppo", *spec["model"], f"phase.sft_run={sft}", f"phase.reward_run={rm}",
                    f"phase.max_steps={steps}", "phase.kl_ctrl=fixed", "phase.kl_coef=0.05", "phase.eval_steps=null",
                    "phase.num_mini_batches=1",
                    "output_root={tmp}"]
            variants = [Variant("rlhf_exp", python(*ours), ENV, ours_with_recipe)]
            for trainer in TRAINERS:
                theirs = ["benchmarks/trl116_grpo_rloo.py", "--trainer", trainer,
                          "--sft", str(sft / "checkpoints" / "final"),
                          "--rm", str(rm / "checkpoints" / "reward_model"), "--prompts", str(prompts),
                          "--steps", str(steps), "--epochs", str(UPDATES_PER_STEP), "--mini-batches", "1",
                          "--out", "{tmp}"]
                variants.append(Variant(f"trl_{trainer}", python(*theirs), ENV, trl_numbers))
            results = interleaved(variants, reps=args.reps)
            check_equal_work(results, steps)
            summary[size] = {}
            for trainer in TRAINERS:
                base = f"trl_{trainer}"
                medians = report({"rlhf_exp": results["rlhf_exp"], base: results[base]}, baseline=base,
                                 extra=("s_per_step",))
                per_step = [a["s_per_step"] / b["s_per_step"] for a, b in zip(results["rlhf_exp"], results[base])]
                summary[size][base] = {**medians["rlhf_exp"], "s_per_step": statistics.median(per_step),
                                       "s_per_step_range": (min(per_step), max(per_step))}
                print(f"s per step: rlhf_exp / {base} round by round: {' '.join(f'{r:.3f}' for r in per_step)}",
                      flush=True)
            print(flush=True)
    print("summary: rlhf_exp / TRL 1.16 GRPO and RLOO, median of the round-by-round ratios (s per step: min-max)")
    for size, by_trainer in summary.items():
        for base, m in by_trainer.items():
            lo, hi = m["s_per_step_range"]
            print(f"  {size:<5} / {base:<8} CPU {m['cpu']:.3f}  wall {m['wall']:.3f}  peak RSS {m['rss_mb']:.3f}  "
                  f"training s per step {m['s_per_step']:.3f} ({lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
