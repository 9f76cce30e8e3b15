"""Quantized loading, LoRA, the mixed-precision dtype rule, the optimizer and the hardware checks (rlhf_exp.models,
rlhf_exp.optim, the hardware part of rlhf_exp.config.validate); and QLoRA (4-bit nf4 base + LoRA + 8-bit AdamW)
learning through SFT and DPO on the chat form of the embedded task, with a scaled-down Qwen2.5 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.validate import validate
from rlhf_exp.models import attention, load_kwargs, weights_dtype
from tests.conftest import ROOT, only_run, read_json, run_cli

bnb = pytest.importorskip("bitsandbytes", reason="pip install -e '.[quant]'")

QLORA = ["hardware.lora=true", "hardware.load_in_4bit=true", "hardware.optimizer=adamw_8bit"]


def typed(compose, *overrides: str):
    return OmegaConf.to_object(compose(list(overrides)))


# ------------------------------------------------------------------ the dtype rule


@pytest.mark.parametrize("overrides, trained, expected", [
    # trained in full under bf16: fp32 master weights, the trainer autocasts
    (["model.dtype=auto", "hardware.precision=bf16"], True, torch.float32),
    # frozen (reference, reward model, LoRA base): the half dtype
    (["model.dtype=auto", "hardware.precision=bf16"], False, torch.bfloat16),
    # DeepSpeed's bf16 optimizer keeps the fp32 master itself: load in bf16
    (["model.dtype=auto", "hardware=cpu_x2", "hardware.precision=bf16", "hardware.distributed=deepspeed_zero3"], True,
     torch.bfloat16),
    # a preset's model.dtype=bfloat16 names the half dtype; trained weights are still fp32 under bf16
    (["hardware=a100x1", "hardware.lora=false"], True, torch.float32),
    (["hardware=a100x1"], False, torch.bfloat16),
    (["hardware=a100x4"], True, torch.bfloat16),
    # model.dtype=float32 always means float32
    (["model.dtype=float32", "hardware.precision=bf16"], False, torch.float32),
    # an fp32 run holds everything in fp32
    (["model.dtype=auto"], True, torch.float32),
    (["model.dtype=auto"], False, torch.float32),
])
def test_weights_dtype_follows_the_mixed_precision_rule(compose, overrides, trained, expected):
    cfg = typed(compose, "model=qwen2_5_7b", "data=ultrafeedback_binarized", *overrides)
    assert weights_dtype(cfg.model, cfg.hardware, trained) == expected
    assert load_kwargs(cfg.model, cfg.hardware, trained)["dtype"] == expected


def test_only_frozen_weights_are_quantized(compose):
    cfg = typed(compose, "model=qwen2_5_7b", "data=ultrafeedback_binarized", "hardware=a100x1")
    frozen = load_kwargs(cfg.model, cfg.hardware, trained=False)
    q = frozen["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and frozen["device_map"] == {"": 0}
    assert "quantization_config" not in load_kwargs(cfg.model, cfg.hardware, trained=True)
    cpu = typed(compose, *QLORA)
    kwargs = load_kwargs(cpu.model, cpu.hardware, trained=False)
    assert kwargs["device_map"] == "cpu" and kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def test_attention_kernel_choice(compose, monkeypatch, capsys):
    import importlib.util

    import rlhf_exp.models as models

    cpu = typed(compose)
    assert attention(cpu.model, cpu.hardware) == "sdpa"
    gpu = typed(compose, "hardware=a100x4")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real_find_spec(name))
    monkeypatch.setattr(models, "_ATTENTION_NOTICE", [])
    assert attention(gpu.model, gpu.hardware, torch.bfloat16) == "sdpa"
    assert attention(gpu.model, gpu.hardware, torch.bfloat16) == "sdpa"
    assert capsys.readouterr().err.count("flash-attn is not installed: attention runs on sdpa") == 1
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert attention(gpu.model, gpu.hardware, torch.bfloat16) == "flash_attention_2"
    # fp32-held (trained) weights: flash-attn takes half precision only, sdpa then
    assert attention(gpu.model, gpu.hardware, torch.float32) == "sdpa"
    # model.attn_implementation wins over hardware's
    gpu.hardware.attn_implementation = "eager"
    assert attention(gpu.model, gpu.hardware, torch.bfloat16) == "eager"
    gpu.model.attn_implementation = "sdpa"
    assert attention(gpu.model, gpu.hardware, torch.bfloat16) == "sdpa"


# ------------------------------------------------------------ 4-bit loading, LoRA


@pytest.fixture(scope="module")
def qwen(scaled_model):
    return scaled_model("qwen2_5")


def test_4bit_loading_quantizes_the_body_and_keeps_heads_whole(compose, qwen, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_exp.models import load_causal_lm, load_reward_model, load_tokenizer, load_value_model

    cfg = typed(compose, "model=local", f"model.path={qwen}", "data=synthetic_chat", *QLORA)
    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, cfg.hardware, tokenizer, trained=False)
    assert isinstance(policy.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert policy.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    assert type(policy.lm_head) is torch.nn.Linear
    # a reward model saved from it: the new score head stays a plain layer (trained whole), the body is 4-bit
    AutoModelForSequenceClassification.from_pretrained(qwen, num_labels=1).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    for load in (lambda: load_reward_model(cfg.model, cfg.hardware, tokenizer, str(tmp_path / "rm"), trained=False),
                 lambda: load_value_model(cfg.model, cfg.hardware, str(tmp_path / "rm"), trained=False)):
        model = load()
        assert type(model.score) is torch.nn.Linear and model.score.weight.dtype == torch.float32
        assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    # trained in full: never quantized
    full = load_causal_lm(cfg.model, cfg.hardware, tokenizer, trained=True)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in full.modules())


def test_wrap_lora_and_the_qlora_merge_into_full_precision(compose, qwen):
    from peft import PeftModel

    from rlhf_exp.models import load_causal_lm, load_tokenizer, load_value_model, merge_adapters, wrap_lora

    cfg = typed(compose, "model=local", f"model.path={qwen}", "data=synthetic_chat", *QLORA)
    tokenizer = load_tokenizer(cfg.model)
    policy = wrap_lora(load_causal_lm(cfg.model, cfg.hardware, tokenizer, trained=False), cfg.model, cfg.hardware)
    assert isinstance(policy, PeftModel)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for n, p in policy.named_parameters() if n in trained)
    # the merge for the next phase goes into dequantized weights: the same function, no 4-bit checkpoint
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    policy.eval()
    with torch.no_grad():
        before = policy(ids).logits
    plain = merge_adapters(policy)
    with torch.no_grad():
        after = plain(ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    # hardware.lora=false: unchanged, unless forced (PPO's critic under phase.critic_lora), head trained whole
    full = typed(compose, "model=local", f"model.path={qwen}", "data=synthetic_chat")
    critic = load_value_model(full.model, full.hardware, str(qwen), trained=False)
    assert wrap_lora(critic, full.model, full.hardware, task_type="TOKEN_CLS") is critic
    critic = wrap_lora(critic, full.model, full.hardware, task_type="TOKEN_CLS", force=True)
    names = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("score" in n and "lora" not in n for n in names)


# --------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("name, cls, optim", [("adamw_torch", torch.optim.AdamW, "adamw_torch_fused"),
                                              ("adamw_8bit", "AdamW8bit", "adamw_bnb_8bit"),
                                              ("paged_adamw_8bit", "PagedAdamW8bit", "paged_adamw_8bit")])
def test_build_optimizer_and_the_trl_name(compose, name, cls, optim, tmp_path, recwarn):
    from rlhf_exp.launch.trl_args import training_kwargs
    from rlhf_exp.optim import build_optimizer, trl_optim_name

    cfg = typed(compose, f"hardware.optimizer={name}")
    param = torch.nn.Parameter(torch.randn(64, 64))  # bitsandbytes keeps 8-bit states from 4096 elements
    opt = build_optimizer([param], cfg.hardware, lr=1e-3, weight_decay=0.01)
    assert type(opt) is (cls if isinstance(cls, type) else getattr(bnb.optim, cls))
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.01
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    opt.step()
    assert not torch.equal(before, param)
    if name != "adamw_torch":
        assert opt.state[param]["state1"].dtype == torch.uint8  # 8-bit moments
    assert trl_optim_name(cfg.hardware) == optim
    assert training_kwargs(cfg, tmp_path, has_eval=False)["optim"] == optim


# ------------------------------------------------------------------ validate


def error_of(compose, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(list(overrides)))
    return str(info.value)


@pytest.mark.parametrize("overrides, expected", [
    (["hardware.load_in_4bit=true"],
     "hardware.load_in_4bit=true with hardware.lora=false: quantized weights are frozen and cannot be fine-tuned in full; "
     "add hardware.lora=true"),
    (["hardware.lora=true", "hardware.load_in_4bit=true", "hardware.load_in_8bit=true"],
     "hardware.load_in_4bit and hardware.load_in_8bit are both true: pick one"),
    (["hardware=cpu_x2", "hardware.distributed=deepspeed_zero3", "hardware.lora=true", "hardware.load_in_4bit=true"],
     "hardware.load_in_4bit=true with hardware.distributed=deepspeed_zero3: quantized weights are not sharded"),
    (["hardware=cpu_x2", "hardware.distributed=fsdp", "hardware.lora=true", "hardware.load_in_8bit=true"],
     "hardware.load_in_8bit=true with hardware.distributed=fsdp:"),
    (["hardware.attn_implementation=flash_attention_2"],
     "hardware.attn_implementation=flash_attention_2 with hardware.accelerator=cpu: flash-attn runs on CUDA GPUs only"),
    (["hardware=a100x4", "hardware.precision=fp32", "hardware.attn_implementation=flash_attention_2"],
     "hardware.attn_implementation=flash_attention_2 with hardware.precision=fp32: flash-attn computes in fp16/bf16"),
    (["hardware.precision=fp16"], "hardware.precision=fp16 needs a GPU"),
    (["hardware.offload_params=true"],
     "hardware.offload_params=true with hardware.distributed=none: only sharded parameters are offloaded"),
    (["hardware=cpu_x2", "hardware.offload_optimizer=true"],
     "hardware.offload_optimizer=true with hardware.distributed=ddp: optimizer states are offloaded by DeepSpeed ZeRO"),
    (["hardware=cpu_x2", "hardware.distributed=fsdp", "hardware.offload_optimizer=true"],
     "(FSDP offloads parameters, gradients and optimizer states together: hardware.offload_params=true)"),
    (["hardware=cpu_x2", "hardware.distributed=deepspeed_zero3", "hardware.offload_optimizer=true",
      "hardware.optimizer=adamw_8bit"],
     "hardware.optimizer=adamw_8bit with hardware.offload_optimizer=true: DeepSpeed then steps with its own CPU Adam"),
])
def test_each_hardware_refusal_names_the_keys_and_the_fix(compose, overrides, expected):
    assert expected in error_of(compose, *overrides)


def test_bitsandbytes_is_looked_up_not_imported(compose, monkeypatch):
    import importlib.util
    import subprocess
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name))
    message = error_of(compose, *QLORA)
    assert "hardware.load_in_4bit=true needs bitsandbytes: pip install -e '.[quant]'" in message
    assert "hardware.optimizer=adamw_8bit needs bitsandbytes" in message
    # a fresh process: composing and validating a QLoRA config imports neither bitsandbytes nor torch
    code = ("import sys; from rlhf_exp.cli import compose; from rlhf_exp.config.validate import validate; "
            f"validate(compose({QLORA!r})); print(sorted(m for m in ('bitsandbytes', 'torch') if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr[-2000:]


def test_the_supported_combinations_validate(compose):
    for overrides in (QLORA, ["hardware=a100x1"], ["hardware=cpu_x2", *QLORA],
                      ["hardware=cpu_x2", "hardware.distributed=deepspeed_zero3", "hardware.optimizer=adamw_8bit"],
                      ["hardware=cpu_x2", "hardware.distributed=deepspeed_zero3", "hardware.offload_optimizer=true"],
                      ["hardware=a100x4", "hardware.offload_params=true", "hardware.offload_optimizer=true"],
                      ["hardware=a100x4", "hardware.distributed=fsdp", "hardware.offload_params=true"],
                      ["hardware.precision=bf16"]):
        validate(compose(["model=local", "model.path=org/x", "data=synthetic_chat", *overrides]))


# -------------------------------------------------------- QLoRA learns on CPU (slow)

SMALL = ["data.synthetic.num_sft_train=1280", "data.synthetic.num_sft_eval=64", "data.synthetic.num_pref_train=640",
         "data.synthetic.num_pref_eval=64", "data.synthetic.num_eval_prompts=48", "phase.save_minutes=null"]


@pytest.mark.slow
def test_qlora_sft_then_dpo_learn_on_cpu(qwen, tmp_path):
    """4-bit nf4 base + LoRA + 8-bit AdamW (the a100x1 recipe, on CPU): SFT raises gold from 0, DPO from the
    merged SFT checkpoint moves its preference accuracy above chance and its loss below ln 2."""
    common = ["model=local", f"model.path={qwen}", "data=synthetic_chat", *QLORA, *SMALL, f"output_root={tmp_path}"]
    proc = run_cli([*common, "phase.max_steps=20", "phase.logging_steps=4"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = only_run(tmp_path, "sft")
    m = read_json(sft / "summary.json")["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"] - 0.3, m
    assert m["gold_score"] > m["gold_score_initial"] + 0.05, m
    loading = json.loads((sft / "launch" / "loading.json").read_text())["policy"]
    assert loading["quantized_layers"] == {"Linear4bit": 14} and loading["dtypes"]["uint8"] > 0
    # the next phase gets merged full-precision weights, not a 4-bit checkpoint
    saved = json.loads((sft / "checkpoints" / "final" / "config.json").read_text())
    assert "quantization_config" not in saved

    proc = run_cli([*common, "phase=dpo", f"phase.sft_run={sft}", "phase.max_steps=10", "phase.logging_steps=2",
                    "phase.per_device_train_batch_size=32"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = read_json(only_run(tmp_path, "dpo") / "summary.json")["metrics"]
    # the merge into dequantized weights kept what SFT learned (the 4-bit layer and its dequantized weights
    # differ only by float rounding, which can flip a few greedy tokens)
    assert d["gold_score_initial"] == pytest.approx(m["gold_score"], abs=0.02)
    assert d["train_loss_last"] < d["train_loss_first"] == pytest.approx(0.6931, abs=1e-3), d
    assert d["eval_rewards_accuracies"] > 0.55, d
