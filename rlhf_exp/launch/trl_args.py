"""Our schema -> TRL/transformers argument objects: the one place this mapping lives.

Runners call ``sft_config`` / ``dpo_config`` / ``reward_config``; nothing else builds TRL configs, so a change of
TRL defaults (e.g. SFTConfig's bf16=True and gradient_checkpointing=True) is handled here once.

Runners build these BEFORE loading the model: under ZeRO-3 the config object creates transformers'
HfDeepSpeedConfig, so ``from_pretrained`` loads each weight straight into its partition (``deepspeed.zero.Init``)
instead of a whole copy per process. The object must stay alive until the model is loaded (transformers holds
the DeepSpeed config through a weak reference): keep it in a variable and give it to the trainer. (Under FSDP,
transformers 5.24 reads the whole checkpoint in every process either way; see runners.common.before_loading.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_exp.config.schema import RunConfig, learning_rate, resumable_checkpoints
from rlhf_exp.launch.sharding import SHARDED
from rlhf_exp.optim import trl_optim_name


def _checkpointing_key() -> str:
    """transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing (old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def sharding_kwargs(hw) -> dict[str, Any]:
    """``hardware.distributed`` -> TrainingArguments' DeepSpeed / FSDP settings (written in
    rlhf_exp.launch.sharding; batch size, precision and clipping stay "auto" for transformers to fill)."""
    from rlhf_exp.launch.sharding import trainer_deepspeed, trainer_fsdp

    deepspeed = trainer_deepspeed(hw)
    if deepspeed is not None:
        return {"deepspeed": deepspeed}
    return trainer_fsdp(hw) or {}


def training_kwargs(cfg: RunConfig, run_dir: Path, has_eval: bool, best_metric: str = "eval_loss",
                    greater_is_better: bool = False) -> dict[str, Any]:
    """Arguments shared by every TRL trainer (they are transformers.TrainingArguments fields)."""
    phase, hw = cfg.phase, cfg.hardware
    precision = str(hw.precision)
    eval_strategy = ("steps" if phase.eval_steps else "epoch") if has_eval else "no"
    early_stop = has_eval and phase.early_stopping_patience > 0
    resumable = resumable_checkpoints(phase)
    by_steps = phase.save_steps is not None
    return {
        "output_dir": str(run_dir / "checkpoints" / "trainer"),
        "learning_rate": learning_rate(phase, hw),
        "num_train_epochs": phase.num_epochs,
        "max_steps": phase.max_steps,
        "per_device_train_batch_size": phase.per_device_train_batch_size,
        "per_device_eval_batch_size": phase.per_device_eval_batch_size,
        "gradient_accumulation_steps": phase.gradient_accumulation_steps,
        "warmup_steps": phase.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        "weight_decay": phase.weight_decay,
        "lr_scheduler_type": str(phase.lr_scheduler),
        "max_grad_norm": phase.max_grad_norm,
        "logging_steps": phase.logging_steps,
        "logging_first_step": True,
        # a NaN/inf loss must show (and stop the run), not be averaged away in the logs, unless bad
        # batches are skipped (NonFiniteGuard drops their update; their loss stays out of the average)
        "logging_nan_inf_filter": phase.skip_nonfinite_batches > 0,
        "eval_strategy": eval_strategy,
        "eval_steps": phase.eval_steps,
        # resumable checkpoints (full state) every save_steps, plus those of save_minutes and stop
        # signals (tracking.checkpoints.Checkpointing); with none, only what restoring the best model
        # after early stopping needs (weights)
        "save_strategy": "steps" if by_steps else eval_strategy if early_stop else "no",
        "save_steps": phase.save_steps if by_steps else phase.eval_steps,
        # transformers counts the protected best checkpoint inside the limit: one more keeps the newest N
        # plus the best (with an eval split), and a checkpoint to fall back on while a new one is marked
        "save_total_limit": (phase.keep_checkpoints + int(has_eval)) if resumable else 2 if early_stop else None,
        # weights only when nothing resumes from them; DeepSpeed and FSDP restore the best model at the end from a
        # full checkpoint only ("DeepSpeed can't be used with `save_only_model` along with `load_best_model_at_end`")
        "save_only_model": not resumable and not (early_stop and str(hw.distributed) in SHARDED),
        "load_best_model_at_end": early_stop,
        # early stopping and the restored "best" model follow this metric
        "metric_for_best_model": best_metric,
        "greater_is_better": greater_is_better,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # under FSDP its own activation checkpointing does it (fsdp_config); the trainer's would gather twice
        _checkpointing_key(): hw.gradient_checkpointing and str(hw.distributed) != "fsdp",
        # hardware.optimizer (under DeepSpeed with offload_optimizer its config names DeepSpeed's own)
        "optim": trl_optim_name(hw),
        "use_cpu": hw.accelerator == "cpu",
        # every parameter gets a gradient in each step: skip DDP's search for unused ones
        "ddp_find_unused_parameters": False if hw.num_processes * hw.num_nodes > 1 else None,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "dataloader_num_workers": hw.num_workers,
        "report_to": "none",  # rlhf_exp's own sinks (metrics.jsonl, W&B) record everything
        "disable_tqdm": False,
        **sharding_kwargs(hw),
    }


def sft_config(cfg: RunConfig, run_dir: Path, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(
        **training_kwargs(cfg, run_dir, has_eval),
        max_length=cfg.phase.max_length,
        completion_only_loss=cfg.phase.completion_only_loss,
        packing=cfg.phase.packing,
        dataset_num_proc=None,
    )


def dpo_config(cfg: RunConfig, run_dir: Path, has_eval: bool):
    from trl import DPOConfig

    return DPOConfig(
        **training_kwargs(cfg, run_dir, has_eval),
        beta=cfg.phase.beta,
        loss_type=[str(cfg.phase.loss_type)],
        max_length=cfg.phase.max_length,
    )


def reward_config(cfg: RunConfig, run_dir: Path, has_eval: bool):
    from trl import RewardConfig

    # an overfit reward model is easier to hack: keep the checkpoint with the best held-out accuracy
    return RewardConfig(
        **training_kwargs(cfg, run_dir, has_eval, best_metric="eval_accuracy", greater_is_better=True),
        max_length=cfg.phase.max_length,
    )
