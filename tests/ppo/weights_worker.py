"""One process of tests/ppo/test_rollout_engines.py's ZeRO-3 check (torchrun, 2 processes over gloo, DeepSpeed's
CPU accelerator): the embedded model with LoRA adapters (B drawn non-zero, so merging changes the weights) partitioned
by a DeepSpeed ZeRO-3 engine as PPO's backend builds it; the weights a rollout engine would be given
(``zero3_whole_parameters`` then ``merged_lora_weights``) against peft's own merge of an unpartitioned copy. Writes
``<out>/rank<N>.json``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    import deepspeed
    from peft import LoraConfig, get_peft_model

    from rlhf_exp.cli import compose
    from rlhf_exp.config.schema import ModelConfig
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer, merged_lora_weights
    from rlhf_exp.ppo.engines import DeepSpeed, zero3_whole_parameters

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = compose(["phase=ppo", "hardware=cpu_x2", "hardware.distributed=deepspeed_zero3", "phase.micro_batch_size=4"])
    torch.manual_seed(0)  # the same model and adapters on both processes
    model = get_peft_model(build_tiny_model(ModelConfig(), build_tiny_tokenizer()),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    expected = {k: v.detach().clone() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if ".base_layer." in n}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1),
                                      config=DeepSpeed.train_config(cfg.phase, cfg.hardware, 2))
    held = sum(p.ds_tensor.numel() for p in engine.module.parameters())  # partitioned: this process's share
    got = {n: t.clone() for n, t in merged_lora_weights(zero3_whole_parameters(engine.module),
                                                        engine.module.peft_config["default"])}
    report = {"held": held, "total": sum(v.numel() for v in expected.values()),
              "missing": sorted(set(expected) - set(got) - {"lm_head.weight"}), "extra": sorted(set(got) - set(expected)),
              "max_abs_diff": max((got[n] - expected[n]).abs().max().item() for n in got if n in expected),
              # the adapters moved the weights they sit on: the merge is not a no-op
              "merge_moved": min((got[n] - w).abs().max().item() for n, w in base.items()), "merged_layers": len(base)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
