"""TRL 1.16's GRPOTrainer or RLOOTrainer (``trl.GRPOTrainer`` / ``trl.RLOOTrainer``) on the embedded task, for
benchmarks/ppo_vs_grpo.py. Runs in the project's own environment (trl 1.16), on checkpoints and prompts the
benchmark hands over:

    python benchmarks/trl116_grpo_rloo.py --trainer grpo|rloo --sft <policy checkpoint> --rm <reward-model checkpoint>
        --prompts prompts.json --steps 40 --out <folder>

Equal work per step with rlhf_exp's PPO run it is compared against (``phase.rollout_batch_size=128
phase.ppo_epochs=2 phase.num_mini_batches=1``: 128 answers per step, then 2 optimizer updates over all 128). One
"step" here is one generation round:

- 128 completions per round: ``num_generations=8`` completions for each of 16 prompts
  (``--batch 128 --group 8``), at most ``max_completion_length=8`` new tokens, temperature 1, stopping at EOS.
- the same optimizer updates per round: ``per_device_train_batch_size = batch / mini_batches`` (128),
  ``gradient_accumulation_steps=1`` (each micro-batch is one optimizer step, over the whole mini-batch in one
  forward/backward, as rlhf_exp's tiny recipe with ``micro_batch_size: null``), ``steps_per_generation =
  mini_batches`` (1; so ``generation_batch_size`` = 128 x 1 = 128, set by TRL's config), ``num_iterations = epochs``
  (2: the buffered round is reused for a second pass before the next generation). TRL generates once every
  ``steps_per_generation x num_iterations`` = 2 optimizer steps, so ``max_steps = steps x 2`` optimizer steps are
  ``steps`` generation rounds; ``trainer.state.global_step`` (optimizer steps) and a count of calls of the trainer's
  ``_generate_and_score_completions`` (generation rounds) are printed to check it. ``--mini-batches 2`` would mirror
  the recipe's 2 mini-batches of 64 (64 x 2 = 128 per round, 4 updates per round).
- a reference model (TRL loads a second copy of the SFT checkpoint) with ``beta=0.05``: GRPO adds the KL (k3
  estimator) to its loss, RLOO subtracts it (per sequence) from the reward, as rlhf_exp's PPO (k1, per token).
- the reward: the reward-model checkpoint as a sequence-classification model in ``reward_funcs`` with its tokenizer
  in ``reward_processing_classes`` (pad token set), scoring prompt + completion text.
- learning rate 1e-4 (the tiny recipe's policy rate), constant schedule, no warm-up, clip epsilon 0.2, seed 0;
  everything else TRL's defaults (GRPO: ``loss_type="dapo"``, ``scale_rewards="group"``; RLOO: leave-one-out
  baseline, no advantage normalisation).

use_cpu, fp32 (bf16 off), no evaluation, no saves, no completion logging, report_to none. Only ``trainer.train()``
is timed. Prints one JSON line: trainer, steps (generation rounds), optimizer updates (global_step), training
seconds, seconds per generation round.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", choices=("grpo", "rloo"), required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    ap.add_argument("--steps", type=int, default=40, help="generation rounds")
    ap.add_argument("--batch", type=int, default=128, help="completions per generation round")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--epochs", type=int, default=2, help="passes over each round (num_iterations)")
    ap.add_argument("--mini-batches", type=int, default=1, help="optimizer updates per pass (steps_per_generation)")
    ap.add_argument("--response-length", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.batch % args.mini_batches or args.batch % args.group:
        ap.error("--batch must be divisible by --mini-batches and by --group")

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    if args.trainer == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    rm_tokenizer = AutoTokenizer.from_pretrained(args.rm)
    prompts = json.loads(open(args.prompts).read())
    dataset = Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    reward = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    reward.config.pad_token_id = rm_tokenizer.pad_token_id
    updates_per_round = args.epochs * args.mini_batches
    config = Config(
        output_dir=args.out, per_device_train_batch_size=args.batch // args.mini_batches,
        gradient_accumulation_steps=1, steps_per_generation=args.mini_batches, num_iterations=args.epochs,
        num_generations=args.group, max_completion_length=args.response_length, temperature=1.0,
        max_steps=args.steps * updates_per_round, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, beta=args.beta, epsilon=0.2, log_completions=False, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, logging_steps=10, disable_tqdm=True)
    trainer = Trainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                      processing_class=tokenizer, reward_processing_classes=rm_tokenizer)
    assert config.generation_batch_size == args.batch, config.generation_batch_size

    rounds = 0
    generate = trainer._generate_and_score_completions

    def counted(*a, **k):
        nonlocal rounds
        rounds += 1
        return generate(*a, **k)

    trainer._generate_and_score_completions = counted
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    updates = trainer.state.global_step
    print(json.dumps({"trl": trl.__version__, "torch": torch.__version__, "trainer": args.trainer, "steps": rounds,
                      "updates": updates, "updates_per_step": updates / max(rounds, 1),
                      "completions_per_step": config.generation_batch_size, "train_s": round(seconds, 3),
                      "s_per_step": round(seconds / max(rounds, 1), 4)}))


if __name__ == "__main__":
    main()
