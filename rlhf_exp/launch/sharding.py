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


def record(run_dir: Path | None, name: str, config: dict) -> None:
    """Write a launch config into the run folder (rank 0; the caller checks) as ``launch/<name>``."""
    if run_dir is None:
        return
    folder = Path(run_dir) / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
