"""``hardware.distributed`` / offload / precision -> the DeepSpeed and FSDP settings: the one place they are
written. TRL phases get them through ``rlhf_exp.launch.trl_args`` (values left "auto" for transformers to
fill); PPO's engines (``rlhf_exp.ppo.engines``) complete them with explicit batch sizes. Whatever a run
uses is written into its folder (``launch/deepspeed.json``, ``launch/fsdp.json``) by :func:`record`.

Pure Python: the dry run and the planner read these without importing torch or DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHARDED = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")


def zero_stage(hw) -> int | None:
    kind = str(hw.distributed)
    return int(kind[-1]) if kind.startswith("deepspeed_zero") else None


def zero_section(hw, frozen: bool = False) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization``. ``frozen``: a model that is only run forward (PPO's reference and
    reward model): stage 3 shards its weights; with hardware.offload_frozen they wait in CPU RAM."""
    stage = zero_stage(hw)
    if frozen:
        # ZeRO-2 shards optimizer states and gradients only, which a frozen model has none of: stage 0 keeps
        # it whole (in bf16); stage 3 shards it
        section: dict[str, Any] = {"stage": 3 if stage == 3 else 0}
        if stage == 3 and hw.offload_frozen:
            section["offload_param"] = {"device": "cpu", "pin_memory": True}
        return section
    section = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if hw.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        if hw.offload_params:
            section["offload_param"] = {"device": "cpu", "pin_memory": True}
        # save whole 16-bit weights, not shards: the next phase loads them directly
        section["stage3_gather_16bit_weights_on_model_save"] = True
    return section


def precision_section(hw) -> dict[str, Any]:
    """DeepSpeed keeps fp32 master weights (and Adam states) in its optimizer under bf16/fp16."""
    precision = str(hw.precision)
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}


def trainer_deepspeed(hw) -> dict[str, Any] | None:
    """The DeepSpeed config of a TRL phase (None without DeepSpeed). Batch sizes, accumulation, clipping,
    precision and the optimizer's hyper-parameters stay "auto": transformers fills them from the
    TrainingArguments (HfTrainerDeepSpeedConfig), so they cannot disagree. The optimizer is the trainer's own
    (``optim``, hardware.optimizer), except with hardware.offload_optimizer: DeepSpeed refuses a client
    optimizer on offloaded states, so its own AdamW (DeepSpeedCPUAdam, steps on the CPU) is named here."""
    if zero_stage(hw) is None:
        return None
    config: dict[str, Any] = {"zero_optimization": zero_section(hw), "bf16": {"enabled": "auto"},
                              "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                              "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto"}
    if hw.offload_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config


def trainer_fsdp(hw) -> dict[str, Any] | None:
    """The FSDP settings of a TRL phase (TrainingArguments' ``fsdp`` and ``fsdp_config``; None without FSDP).
    FSDP2 (``fully_shard``): parameters, gradients and optimizer states sharded, each transformer block
    (the model's _no_split_modules) its own unit, parameters resharded after the forward.
    cpu_ram_efficient_loading: when FSDP wraps the model, rank 0's weights are broadcast into the other processes'
    shards; those processes never read the checkpoint (``models.broadcast_loading`` builds them a skeleton on the
    meta device: transformers 5.24's from_pretrained would read the whole checkpoint in every process).
    hardware.offload_params: parameters, gradients and optimizer states in CPU RAM (CPUOffloadPolicy).
    hardware.gradient_checkpointing: FSDP's own activation checkpointing (the trainer's would all-gather once
    more in the backward). A full state dict at save time: the next phase loads it directly."""
    if str(hw.distributed) != "fsdp":
        return None
    # fsdp=True: the legacy strings ("full_shard auto_wrap") are deprecated in transformers 5
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": True,
                            "cpu_offload": bool(hw.offload_params),
                            "activation_checkpointing": bool(hw.gradient_checkpointing),
                            "state_dict_type": "FULL_STATE_DICT"}}


def record(run_dir: Path | None, name: str, config: dict) -> Path | None:
    """Write a launch config into the run folder as ``launch/<name>`` (JSON; rank 0 only, the others return
    None). What a run was launched with is then on disk beside its results."""
    import os

    if run_dir is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    folder = Path(run_dir) / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(_finite(config), indent=2, sort_keys=True, default=str) + "\n")
    return path


def _finite(value: Any) -> Any:
    """Strict JSON has no Infinity: transformers sets DeepSpeed's steps_per_print to inf ("never"), written as the
    largest int64, which DeepSpeed reads the same way; NaN as a string."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return (2**63 - 1) if value > 0 else -(2**63 - 1)
    return value
