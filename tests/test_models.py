"""Tokenizer and model building: the embedded model and the hub loading path on a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_exp.models import (
    TINY_VOCAB,
    build_tiny_model,
    build_tiny_tokenizer,
    load_causal_lm,
    load_kwargs,
    load_tokenizer,
)


def test_tiny_tokenizer_round_trip_and_special_tokens():
    tok = build_tiny_tokenizer()
    ids = tok("3 1 4 1 5 = 1 1 3 4 5<eos>")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 13 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "3 1 4 1 5 = 1 1 3 4 5"
    assert len(tok) == len(TINY_VOCAB) == 15


def test_tiny_model_is_small_and_deterministic(compose):
    cfg = compose([])
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_object(cfg).model
    tok = build_tiny_tokenizer()
    a, b = build_tiny_model(model_cfg, tok), build_tiny_model(model_cfg, tok)
    assert 50_000 < sum(p.numel() for p in a.parameters()) < 200_000
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_hub_path_loads_a_local_folder_with_the_presets_settings(compose, tmp_path):
    """model=<real preset> model.path=<folder>: the real from_pretrained code path, no download."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose([]))
    tok = build_tiny_tokenizer()
    build_tiny_model(cfg.model, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hub = OmegaConf.to_object(compose(["model=qwen2_5_7b", f"model.path={tmp_path}", "model.chat_template=chatml",
                                       "data=ultrafeedback_binarized"]))
    tokenizer = load_tokenizer(hub.model)
    assert "<|im_start|>" in tokenizer.chat_template
    model = load_causal_lm(hub.model, hub.hardware, tokenizer)
    assert model.dtype == torch.bfloat16  # the preset's dtype was applied
    assert load_kwargs(hub.model, hub.hardware).get("attn_implementation") == "sdpa"  # CPU: sdpa, named explicitly


@pytest.mark.parametrize("precision,trained,expected", [("bf16", False, torch.bfloat16), ("fp32", False, torch.float32),
                                                        ("bf16", True, torch.float32), ("fp32", True, torch.float32)])
def test_auto_dtype_follows_hardware_precision(compose, precision, trained, expected):
    """Frozen weights in the run's precision; weights trained in full keep an fp32 master copy under bf16."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose(["model=qwen2_5_7b", "model.dtype=auto", "data=ultrafeedback_binarized",
                                       f"hardware.precision={precision}"]))
    assert load_kwargs(cfg.model, cfg.hardware, trained=trained)["dtype"] == expected


def test_a_save_that_fills_the_disk_leaves_no_half_checkpoint(compose, tmp_path, monkeypatch):
    import errno

    from omegaconf import OmegaConf

    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer, save_for_next_phase

    cfg = OmegaConf.to_object(compose([]))
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(cfg.model, tokenizer)
    good = save_for_next_phase(model, tokenizer, tmp_path / "final", "policy", 1, "run")
    assert (good / "checkpoint.json").is_file()
    real_save = type(model).save_pretrained

    def fill_disk(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        (Path(folder) / "model.safetensors").write_bytes(b"trunc")  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", fill_disk)
    with pytest.raises(OSError, match=r"disk full while saving the policy checkpoint to .*/final \(No space left on "
                                      r"device\); nothing half-written was kept: free space, or move output_root"):
        save_for_next_phase(model, tokenizer, tmp_path / "final", "policy", 2, "run")
    assert json.loads((good / "checkpoint.json").read_text())["step"] == 1  # the previous good save is intact
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_new_score_head_is_reported_in_one_line_not_a_table(scaled_model, compose, capsys):
    """transformers' LOAD REPORT table (UNEXPECTED lm_head, MISSING score) becomes one line of ours."""
    from omegaconf import OmegaConf

    from rlhf_exp.models import load_reward_model

    folder = scaled_model("qwen2_5")
    cfg = OmegaConf.to_object(compose(["model=local", f"model.path={folder}", "data=synthetic_chat"]))
    tokenizer = load_tokenizer(cfg.model)
    capsys.readouterr()
    load_reward_model(cfg.model, cfg.hardware, tokenizer, str(folder))
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err
    ours = [line for line in err.splitlines() if line.startswith("rlhf_exp")]
    assert ours == [f"rlhf_exp: reward model from {folder}: new, randomly initialised: score.weight; "
                    "left unused from the checkpoint: lm_head.weight"]


@pytest.mark.parametrize("lora,phase,expected", [(False, "sft", 2e-5), (True, "sft", 2e-4), (True, "dpo", 5e-6),
                                                 (True, "rm", 1e-4), (False, "dpo", 5e-7)])
def test_lora_runs_train_at_the_lora_learning_rate(compose, tmp_path, lora, phase, expected):
    """The alignment-handbook's LoRA/QLoRA rates apply under hardware.lora=true, not full fine-tuning's."""
    from rlhf_exp.launch.trl_args import training_kwargs

    cfg = compose(["model=qwen2_5_7b", "data=ultrafeedback_binarized", "hardware=a100x1", f"phase={phase}",
                   f"hardware.lora={str(lora).lower()}"])
    assert training_kwargs(cfg, tmp_path, has_eval=True)["learning_rate"] == expected


def test_reward_scores_read_chat_and_plain_pairs_as_reward_training_did(scaled_model, compose):
    """Chat-message pairs (HH-RLHF, UltraFeedback) are scored through the chat template; plain strings as
    prompt + answer + EOS (the RM phase's reward statistics used to crash on message lists)."""
    from omegaconf import OmegaConf

    from rlhf_exp.data.encode import scored_ids
    from rlhf_exp.evaluation import reward_scores, score_ids
    from rlhf_exp.models import load_reward_model

    folder = scaled_model("llama3_1")
    cfg = OmegaConf.to_object(compose(["model=local", f"model.path={folder}", "data=synthetic_chat"]))
    tok = load_tokenizer(cfg.model)
    rm = load_reward_model(cfg.model, cfg.hardware, tok, str(folder))
    prompts = [[{"role": "user", "content": "Sort these digits: 2 1"}], [{"role": "user", "content": "Hi there"}]]
    answers = [[{"role": "assistant", "content": "1 2"}], [{"role": "assistant", "content": "Hello, how are you?"}]]
    batched = reward_scores(rm, tok, prompts, answers, batch_size=2)
    alone = [score_ids(rm, [scored_ids(tok, p, a)], tok.pad_token_id, "cpu")[0] for p, a in zip(prompts, answers)]
    assert torch.allclose(batched, torch.stack(alone), atol=1e-5)
    plain = reward_scores(rm, tok, ["Sort 2 1:", "Hi"], [" 1 2", " Hello"], batch_size=2)
    assert plain.shape == (2,) and torch.isfinite(plain).all()
