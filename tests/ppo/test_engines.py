"""PPO's engine settings and helpers, without starting processes (the 2-process runs: test_sharded.py)."""

from __future__ import annotations

import pytest
import torch

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.validate import validate
from rlhf_exp.models import merged_lora_state
from rlhf_exp.ppo.engines import DeepSpeed, backend_for, micro_batches


def test_each_engine_has_its_backend(compose):
    names = {d: backend_for(compose(["phase=ppo", f"hardware.distributed={d}", "hardware.num_processes=2"]).hardware)
             .__name__ for d in ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")}
    assert names == {"none": "Accelerated", "ddp": "Accelerated", "fsdp": "FSDP", "deepspeed_zero2": "DeepSpeed",
                     "deepspeed_zero3": "DeepSpeed"}


def test_micro_batches_split_each_process_share_of_a_mini_batch(compose):
    # 128 rollouts / 2 mini-batches / 2 processes = 32 sequences per process and mini-batch
    phase = compose(["phase=ppo", "phase.micro_batch_size=8"]).phase
    assert micro_batches(phase, world=2) == (8, 4)
    assert micro_batches(compose(["phase=ppo"]).phase, world=2) == (32, 1)  # null: the whole share at once


def test_a_micro_batch_that_does_not_divide_the_share_is_refused(compose):
    with pytest.raises(ConfigError, match=r"phase.micro_batch_size=12 must divide .* = 32 sequences; use a divisor of 32"):
        validate(compose(["phase=ppo", "hardware=cpu_x2", "phase.micro_batch_size=12"]))


def test_deepspeed_ppo_refuses_skipping_nonfinite_batches(compose):
    with pytest.raises(ConfigError, match="phase.skip_nonfinite_batches=2 with hardware.distributed=deepspeed_zero3"):
        validate(compose(["phase=ppo", "hardware=cpu_x2", "hardware.distributed=deepspeed_zero3",
                          "phase.skip_nonfinite_batches=2"]))


@pytest.mark.parametrize("hardware", ["a100x8", "cpu_x2 hardware.distributed=deepspeed_zero2"])
def test_deepspeed_ppo_config_passes_deepspeeds_own_checks(compose, hardware):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    first, *rest = hardware.split()
    cfg = compose(["phase=ppo", f"hardware={first}", *rest, "phase.micro_batch_size=4"])
    world = cfg.hardware.num_processes
    train = DeepSpeed.train_config(cfg.phase, cfg.hardware, world)
    checked = DeepSpeedConfig(train)
    share = cfg.phase.rollout_batch_size // cfg.phase.num_mini_batches // world
    assert (checked.train_micro_batch_size_per_gpu, checked.gradient_accumulation_steps) == (4, share // 4)
    # a mini-batch over all processes (DeepSpeedConfig counts the processes of the group it finds: here one)
    assert 4 * checked.gradient_accumulation_steps * world == cfg.phase.rollout_batch_size // cfg.phase.num_mini_batches
    assert checked.train_batch_size == 4 * checked.gradient_accumulation_steps * checked.world_size
    assert checked.zero_optimization_stage == (3 if first == "a100x8" else 2)
    assert checked.bfloat16_config.enabled == (first == "a100x8") and checked.gradient_clipping == cfg.phase.max_grad_norm
    frozen = DeepSpeedConfig(DeepSpeed.frozen_config(cfg.phase, cfg.hardware, world))
    assert frozen.zero_optimization_stage == (3 if first == "a100x8" else 0)


def test_merged_lora_state_dict_matches_peft_merge_and_unload():
    """A sharded run gathers the peft model's full state dict and merges on rank 0 without peft's help."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters matter
            p.data.normal_()
    merged = merged_lora_state(model.state_dict(), model.peft_config["default"])
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"])
