"""``hardware.optimizer`` -> the optimizer: torch AdamW, or bitsandbytes' 8-bit AdamW (paged or not).

PPO builds its optimizers with :func:`build_optimizer`; the TRL phases name the same optimizer to
transformers with :func:`trl_optim_name` (``TrainingArguments.optim``), so both paths train with the same one.
Under DeepSpeed with hardware.offload_optimizer, DeepSpeed's own CPU Adam runs instead (rlhf_exp.launch.sharding).

Memory per trained parameter (Adam's two moments): fp32 states 8 bytes, 8-bit states 2 bytes (block-wise
quantized, bitsandbytes). Paged: the states live in CUDA unified memory and page out to CPU RAM under GPU
memory pressure (on CPU bitsandbytes falls back to the plain 8-bit optimizer, with a warning).
"""

from __future__ import annotations

from collections.abc import Iterable

from rlhf_exp.config.schema import HardwareConfig

# hardware.optimizer -> transformers' OptimizerNames value. adamw_torch: transformers 5's own default, torch's fused
# AdamW kernel (the same update as the foreach kernel up to rounding; every measured TRL-phase number in README was
# taken with it, and at the tiny SFT recipe's rate the rounding alone moves its gold by ~0.07)
TRL_OPTIM = {"adamw_torch": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def trl_optim_name(hardware: HardwareConfig) -> str:
    """The ``optim`` string of TrainingArguments (SFT, RM, DPO) for hardware.optimizer."""
    return TRL_OPTIM[str(hardware.optimizer)]


def build_optimizer(params: Iterable, hardware: HardwareConfig, lr: float, weight_decay: float):
    """The optimizer hardware.optimizer names, over ``params`` (parameters or parameter groups): torch.optim.AdamW,
    bitsandbytes.optim.AdamW8bit or bitsandbytes.optim.PagedAdamW8bit, with transformers' AdamW defaults
    (betas 0.9/0.999, eps 1e-8) so PPO and the TRL phases step alike."""
    name = str(hardware.optimizer)
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    if name == "adamw_torch":
        import torch

        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb  # validate() checked it is installed

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    raise ValueError(f"hardware.optimizer={name}: unknown (adamw_torch, adamw_8bit, paged_adamw_8bit)")
