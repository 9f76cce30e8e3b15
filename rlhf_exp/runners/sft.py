"""Supervised fine-tuning on TRL's SFTTrainer, loss on answer tokens only."""

from __future__ import annotations

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def build(cfg: RunConfig, run: Run):
    """The trainer, ready to train, and what finishing needs (also used by tests to inspect it)."""
    from trl import SFTTrainer

    from rlhf_exp.launch.trl_args import sft_config
    from rlhf_exp.models import load_causal_lm, lora_config
    from rlhf_exp.runners.common import Built, callbacks, phase_data, record_initial_gold, start

    _, tokenizer = start(cfg, run)
    data = phase_data(cfg, tokenizer, preferences=False, run=run)
    model = load_causal_lm(cfg.model, cfg.hardware, tokenizer)
    metrics: dict = {}
    record_initial_gold(cfg, model, tokenizer, data, run, metrics)

    log, cbs = callbacks(cfg, run, data)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, run.dir, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.model, cfg.hardware),
        callbacks=cbs,
    )
    return Built(trainer, log, tokenizer, data, metrics)


def run(cfg: RunConfig, run: Run) -> dict:
    from rlhf_exp.runners.common import train_evaluate_save

    return train_evaluate_save(cfg, run, build(cfg, run))
