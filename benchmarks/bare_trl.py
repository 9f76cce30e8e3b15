"""A bare TRL script for one phase of the embedded task: what a user writes by hand to do the job that
``python -m rlhf_exp phase=<phase>`` does with the tiny recipe (conf/recipe/tiny_<phase>.yaml), with the same
trainer settings: the same model (the tiny Llama, or the SFT checkpoint given), the same data (the embedded
task's demonstrations or preference pairs, built by rlhf_exp.data.synthetic as the framework builds them),
the same epochs, batch sizes, learning rate, schedule, evaluation and best-model rules. Then one final
evaluation and the model saved. None of rlhf_exp's run machinery: no run folder, manifest, metrics files, data
checks, gold evaluations, held-out generation or lineage.

    python benchmarks/bare_trl.py sft --out /tmp/bare_sft
    python benchmarks/bare_trl.py rm  --sft <checkpoint folder> --out /tmp/bare_rm
    python benchmarks/bare_trl.py dpo --sft <checkpoint folder> --out /tmp/bare_dpo

Prints one JSON line: the final eval metrics and the steps trained. Used by benchmarks/phases.py.
"""

from __future__ import annotations

import argparse
import json
import os


def defaults():
    """The default config's data and model settings (the inputs both variants share)."""
    from omegaconf import OmegaConf

    from rlhf_exp.cli import compose

    return OmegaConf.to_object(compose([]))


def data():
    from rlhf_exp.data.synthetic import build_task_data

    cfg = defaults()
    return build_task_data(cfg.data.synthetic, cfg.data.seed)


def common(out: str, epochs: float, lr: float, logging_steps: int) -> dict:
    return dict(output_dir=out, num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=64,
                per_device_eval_batch_size=256, lr_scheduler_type="constant", warmup_steps=0.0, max_grad_norm=1.0,
                logging_steps=logging_steps, logging_first_step=True, seed=0, data_seed=0, use_cpu=True,
                report_to="none", bf16=False, fp16=False, disable_tqdm=True)


def pairs(rows):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in rows])


def sft(args) -> dict:
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    d = data()
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(defaults().model, tokenizer)
    config = SFTConfig(**common(args.out, 10, 3e-3, 16), eval_strategy="epoch", save_strategy="epoch",
                       save_total_limit=2, save_only_model=True, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=False, max_length=32,
                       completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(d["sft_train"]),
                         eval_dataset=Dataset.from_list(d["sft_eval"]), processing_class=tokenizer,
                         callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    return finish(trainer, args.out)


def rm(args) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, EarlyStoppingCallback
    from trl import RewardConfig, RewardTrainer

    d = data()
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    model = AutoModelForSequenceClassification.from_pretrained(args.sft, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_input_embeddings().requires_grad_(False)
    config = RewardConfig(**common(args.out, 3, 1e-3, 8), eval_strategy="epoch", save_strategy="epoch",
                          save_total_limit=2, save_only_model=True, load_best_model_at_end=True,
                          metric_for_best_model="eval_accuracy", greater_is_better=True, max_length=32)
    trainer = RewardTrainer(model=model, args=config, train_dataset=pairs(d["pref_train"]),
                            eval_dataset=pairs(d["pref_eval"]), processing_class=tokenizer,
                            callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    return finish(trainer, args.out)


def dpo(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    d = data()
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    model = AutoModelForCausalLM.from_pretrained(args.sft)
    ref = AutoModelForCausalLM.from_pretrained(args.sft)
    config = DPOConfig(**common(args.out, 2, 5e-4, 8), eval_strategy="steps", eval_steps=32, save_strategy="no",
                       beta=0.1, loss_type=["sigmoid"], max_length=32)
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=pairs(d["pref_train"]),
                         eval_dataset=pairs(d["pref_eval"]), processing_class=tokenizer)
    trainer.train()
    return finish(trainer, args.out)


def finish(trainer, out: str) -> dict:
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(out, "final"))
    return {"steps": trainer.state.global_step, **{k: v for k, v in metrics.items() if k in
                                                    ("eval_loss", "eval_accuracy", "eval_rewards/accuracies")}}


def main() -> None:
    from transformers import set_seed

    set_seed(0)  # a new reward head is initialised before the trainer seeds anything
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=("sft", "rm", "dpo"))
    ap.add_argument("--sft", help="the SFT checkpoint folder (rm, dpo)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(json.dumps({"sft": sft, "rm": rm, "dpo": dpo}[args.phase](args)))


if __name__ == "__main__":
    main()
