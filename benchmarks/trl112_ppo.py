"""TRL 1.12's PPOTrainer (``trl.experimental.ppo``, the last TRL with a PPO trainer) on the embedded task, for
benchmarks/ppo_vs_trl.py. Runs in that benchmark's own virtual environment (trl==1.12.0 beside the same torch,
transformers, accelerate and datasets as the project's), on checkpoints and prompts the benchmark hands over:

    <venv>/bin/python benchmarks/trl112_ppo.py --sft <policy checkpoint> --rm <reward-model checkpoint>
        --prompts prompts.json --steps 40 --out <folder>

Settings as rlhf_exp's tiny PPO recipe with a fixed KL coefficient and one mini-batch: 128 answers per step, 2 PPO
epochs of one update over all 128 (TRL 1.12 counts its rollout batch as per_device_train_batch_size x
gradient_accumulation_steps and steps the optimizer once per gradient_accumulation_steps micro-batches, so 2
mini-batches of 64 with one update each cannot be expressed without changing the rollout size), at most 8 new
tokens stopping at EOS, temperature 1, lr 1e-4 (one optimizer for policy and value model, as TRL's trainer has),
constant schedule, kl_coef 0.05 (k1), clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95; the value model
initialised from the reward model, the reference a second copy of the SFT policy. No sample generations, no saves.
Prints one JSON line: steps, training seconds, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    prompts = json.loads(open(args.prompts).read())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    ref = AutoModelForCausalLM.from_pretrained(args.sft)
    reward = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.rm, num_labels=1)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    config = PPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        total_episodes=args.steps * args.batch, num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=args.batch, response_length=args.response_length, stop_token="eos",
        temperature=1.0, learning_rate=args.lr, lr_scheduler_type="constant", kl_coef=args.kl_coef,
        kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        num_sample_generations=0, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        logging_steps=10, disable_tqdm=True, dataloader_drop_last=True)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    print(json.dumps({"trl": trl.__version__, "torch": torch.__version__, "steps": steps,
                      "train_s": round(seconds, 3), "s_per_step": round(seconds / max(steps, 1), 4)}))


if __name__ == "__main__":
    main()
