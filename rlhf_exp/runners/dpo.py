"""Direct Preference Optimization on TRL's DPOTrainer, starting from an SFT run.

The reference model is the SFT model. With ``hardware.lora=true`` TRL uses the policy with its
adapters disabled as the reference, so no second copy of the weights is held.
"""

from __future__ import annotations

from rlhf_exp.config.schema import RunConfig
from rlhf_exp.tracking.run import Run


def build(cfg: RunConfig, run: Run):
    from trl import DPOTrainer

    from rlhf_exp.launch.trl_args import dpo_config
    from rlhf_exp.models import load_causal_lm, lora_config
    from rlhf_exp.runners.common import Built, callbacks, phase_data, record_initial_gold, start

    sft, tokenizer = start(cfg, run)
    data = phase_data(cfg, tokenizer, preferences=True, run=run)
    model = load_causal_lm(cfg.model, cfg.hardware, tokenizer, checkpoint=sft["checkpoint"])
    metrics: dict = {"sft_run": sft["run_id"]}
    record_initial_gold(cfg, model, tokenizer, data, run, metrics)

    log, cbs = callbacks(cfg, run, data)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # TRL: adapters disabled under LoRA, else a fresh load of the SFT checkpoint
        args=dpo_config(cfg, run.dir, has_eval=data.eval is not None),
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
