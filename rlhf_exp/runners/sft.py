"""Supervised fine-tuning on TRL's SFTTrainer, loss on answer tokens only."""

from __future__ import annotations

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def build(cfg: RunConfig, run: Run):
    """The trainer, ready to train, and what finishing needs (also used by tests to inspect it)."""
    from trl import SFTTrainer

    from rlhf_exp.launch.trl_args import sft_config
    from rlhf_exp.models import broadcast_loading, load_causal_lm, lora_config, prepare_for_adapters, upcast_trained
    from rlhf_exp.runners.common import (
        Built,
        after_loading,
        before_loading,
        callbacks,
        phase_data,
        record_initial_gold,
        start,
    )

    hw = cfg.hardware
    _, tokenizer = start(cfg, run)
    data = phase_data(cfg, tokenizer, preferences=False, run=run)
    # the config before the model: under ZeRO-3 it then loads partitioned (see trl_args)
    args = sft_config(cfg, run.dir, has_eval=data.eval is not None)
    before_loading(cfg, run, args)
    # under LoRA the base is frozen: half precision, or 4/8-bit with hardware.load_in_4bit/8bit (QLoRA)
    with run.stage("models"), broadcast_loading(hw):  # under FSDP only rank 0 reads the checkpoint
        model = load_causal_lm(cfg.model, hw, tokenizer, trained=not hw.lora)
    after_loading(run, policy=model)
    metrics: dict = {}
    record_initial_gold(cfg, model, tokenizer, data, run, metrics)

    log, cbs = callbacks(cfg, run, data)
    with run.stage("setup"):  # the TRL trainer: its arguments, its tokenisation of the data, the wrapping
        trainer = SFTTrainer(
            model=prepare_for_adapters(model, hw) if hw.lora else model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config(cfg.model, hw),
            callbacks=cbs,
        )
    upcast_trained(trainer.model)
    return Built(trainer, log, tokenizer, data, metrics)


def run(cfg: RunConfig, run: Run) -> dict:
    from rlhf_exp.runners.common import train_evaluate_save

    return train_evaluate_save(cfg, run, build(cfg, run))
