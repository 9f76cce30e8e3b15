"""Direct Preference Optimization on TRL's DPOTrainer, starting from an SFT run.

The reference model is the SFT model, loaded frozen (in the half dtype under bf16/fp16). With
``hardware.lora=true`` TRL uses the policy with its adapters disabled as the reference, so no second copy of
the weights is held.
"""

from __future__ import annotations

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def build(cfg: RunConfig, run: Run):
    from trl import DPOTrainer

    from rlhf_exp.data.check import report_run
    from rlhf_exp.launch.trl_args import dpo_config
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
    sft, tokenizer = start(cfg, run)
    data = phase_data(cfg, tokenizer, preferences=True, run=run)
    report_run(cfg, run, tokenizer)  # the data checks (python -m rlhf_exp.data check) into the summary
    # the config before the model: under ZeRO-3 it then loads partitioned (see trl_args)
    args = dpo_config(cfg, run.dir, has_eval=data.eval is not None)
    before_loading(cfg, run, args)
    # under FSDP only rank 0 reads the checkpoint (the reference, below, TRL shards without broadcasting: it loads
    # whole everywhere)
    with run.stage("models"), broadcast_loading(hw):
        model = load_causal_lm(cfg.model, hw, tokenizer, checkpoint=sft["checkpoint"], trained=not hw.lora)
    after_loading(run, policy=model)
    metrics: dict = {"sft_run": sft["run_id"]}
    record_initial_gold(cfg, model, tokenizer, data, run, metrics)

    # the reference: under LoRA the policy with its adapters disabled (TRL's, no second copy); else the SFT
    # checkpoint again, frozen, so in the half dtype (TRL would load it in the policy's fp32)
    with run.stage("models"):
        ref_model = None if hw.lora else load_causal_lm(cfg.model, hw, tokenizer, checkpoint=sft["checkpoint"],
                                                        trained=False)
    log, cbs = callbacks(cfg, run, data)
    held_out = held_out_eval(cfg, run, data, tokenizer, metrics)
    with run.stage("setup"):  # the TRL trainer: its arguments, its tokenisation of the data, the wrapping
        trainer = DPOTrainer(
            # TRL puts the adapters on (peft_config): given an already wrapped model it would add a second, "ref"
            # adapter as the reference instead of disabling the adapters
            model=prepare_for_adapters(model, hw) if hw.lora else model,
            ref_model=ref_model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config(cfg.model, hw),
            callbacks=cbs if held_out is None else [*cbs, held_out],
        )
    if held_out is not None:
        held_out.trainer = trainer
    upcast_trained(trainer.model)
    return Built(trainer, log, tokenizer, data, metrics)


def held_out_eval(cfg: RunConfig, run: Run, data, tokenizer, metrics: dict):
    """The held-out evaluation every phase.eval_steps and the health monitor on it (rlhf_exp.heldout); None
    without held-out prompts or with phase.eval_num_prompts=0."""
    from rlhf_exp.data.loading import held_out_prompts
    from rlhf_exp.data.synthetic import gold_reward
    from rlhf_exp.heldout import HeldOutEval
    from rlhf_exp.monitor import monitor_of
    from rlhf_exp.runners.common import sharded

    prompts = held_out_prompts(data)
    if not prompts or cfg.phase.eval_num_prompts < 1:
        return None
    return HeldOutEval(cfg, run, prompts, tokenizer, metrics, gold_fn=gold_reward if data.eval_prompts else None,
                       monitor=lambda: monitor_of(cfg, run, per_step=False),
                       generate_kwargs={"synced_gpus": True} if sharded(cfg) else {})


def run(cfg: RunConfig, run: Run) -> dict:
    from rlhf_exp.runners.common import train_evaluate_save

    return train_evaluate_save(cfg, run, build(cfg, run))
