"""phase.rollout_engine / phase.generation_cache / phase.compile_generation: the hf engine's static cache samples
what the dynamic one samples; the vllm engine's wiring (weights loaded before each rollout after an update, LoRA
merged, per-row seeds, log-probabilities recomputed by the policy) on CPU against tests/fake_vllm, a stand-in for
vLLM's offline API. vLLM itself needs a GPU: benchmarks/rollout_engines.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.validate import validate
from rlhf_exp.data.encode import pad, prompt_ids
from rlhf_exp.data.synthetic import chat_prompt
from rlhf_exp.sampling import SeededSampler, sample

FAKE = Path(__file__).resolve().parents[1] / "fake_vllm"
PROMPTS = [chat_prompt(p) for p in ("3 1 4 1 5 =", "9 9 9 9 9 =", "2 7 1 8 2 =", "1 2 3 =")]


# what VLLMEngine sets for vLLM's external launcher in its own process; a test process must not keep them (a
# launcher started later, torchrun or the CLI, would take itself for a worker of a one-process group)
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake_vllm(monkeypatch):
    import os

    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    import vllm

    assert vllm.__version__ == "0.0-fake"
    vllm.ENGINES.clear()
    yield vllm
    sys.modules.pop("vllm", None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_static_cache_samples_what_the_dynamic_one_samples(scaled_model, compose):
    """Same seeds, same tokens and the same recorded log-probabilities (fp32) with the cache allocated once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_exp.ppo.rollout_engines import generation_settings

    folder = scaled_model("qwen2_5")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, attn = pad([prompt_ids(tok, p) for p in PROMPTS], tok.pad_token_id, side="left")
    runs = {}
    for cache in ("dynamic", "static"):
        settings = generation_settings(compose(["phase=ppo", f"phase.generation_cache={cache}"]).phase, "cpu")
        sampler = SeededSampler(1.0, 7, slice(0, len(PROMPTS)), len(PROMPTS), "cpu", record=True)
        with torch.no_grad():
            out = sample(model, tok, ids, attn, sampler, max_new_tokens=10, generation=settings)
        runs[cache] = out, sampler.recorded(out.shape[1] - ids.shape[1])[0]
    assert settings == {"cache_implementation": "static", "disable_compile": True}
    assert torch.equal(runs["dynamic"][0], runs["static"][0])
    assert torch.allclose(runs["dynamic"][1], runs["static"][1], atol=1e-5)


def test_compiled_generation_is_asked_of_transformers_on_every_device(compose):
    from rlhf_exp.ppo.rollout_engines import generation_settings

    phase = compose(["phase=ppo", "phase.generation_cache=static", "phase.compile_generation=true"]).phase
    cpu, gpu = generation_settings(phase, "cpu")["compile_config"], generation_settings(phase, "cuda")["compile_config"]
    assert cpu._compile_all_devices and (cpu.mode, gpu.mode) == ("default", "reduce-overhead")
    assert generation_settings(compose(["phase=ppo"]).phase, "cpu") == {}


@pytest.mark.parametrize("overrides, message", [
    (["phase.rollout_engine=vllm"], "phase.rollout_engine=vllm with hardware=cpu .* vLLM runs on CUDA GPUs only"),
    (["hardware=a100x1", "phase.rollout_engine=vllm", "phase.rollout_logprobs=generate"],
     "phase.rollout_logprobs=generate with phase.rollout_engine=vllm"),
    (["hardware=a100x1", "phase.rollout_engine=vllm", "hardware.load_in_4bit=true", "hardware.lora=true"],
     "phase.rollout_engine=vllm with a quantized policy"),
    (["hardware=a100x1", "phase.rollout_engine=vllm", "phase.generation_cache=static"],
     "leave them at their defaults"),
    (["hardware=a100x1", "phase.rollout_engine=vllm", "phase.vllm_gpu_memory_utilization=1.5"],
     r"phase.vllm_gpu_memory_utilization=1.5: must be in \(0, 1\)"),
    (["phase.vllm_sleep=true"], "phase.vllm_sleep=true sets the vllm engine"),
    (["phase.compile_generation=true"], "set phase.generation_cache=static too"),
    (["hardware=cpu_x2", "hardware.distributed=fsdp", "phase.generation_cache=static", "phase.compile_generation=true"],
     "phase.compile_generation=true with hardware.distributed=fsdp"),
])
def test_rollout_engine_settings_that_cannot_work_are_refused_by_name(compose, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["phase=ppo", *overrides]))


def test_vllm_refuses_a_context_longer_than_the_models_positions(compose, scaled_model, fake_vllm):
    folder = scaled_model("qwen2_5")
    positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ConfigError, match=f"phase.max_length={positions + 1} with phase.rollout_engine=vllm: the model "
                                          f".* has max_position_embeddings={positions}"):
        validate(compose(["phase=ppo", "hardware=a100x1", "hardware.lora=false", "phase.rollout_engine=vllm",
                          "model=local", f"model.path={folder}", "data=synthetic_chat",
                          f"phase.max_length={positions + 1}"]))


def test_vllm_not_installed_is_refused_before_anything_loads(compose, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"vLLM is not installed in this environment: pip install 'rlhf_exp\[vllm\]'"):
        validate(compose(["phase=ppo", "hardware=a100x1", "phase.rollout_engine=vllm"]))


def _trainer(compose, folder, lora: bool, engine: str = "vllm"):
    from accelerate import Accelerator
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from rlhf_exp.models import wrap_lora
    from rlhf_exp.ppo.trainer import PPOTrainer

    cfg = compose(["phase=ppo", f"phase.rollout_engine={engine}", "phase.rollout_batch_size=4", "phase.max_new_tokens=6",
                   "phase.ppo_epochs=1", "phase.learning_rate=1e-3", "phase.lora_learning_rate=1e-2",
                   f"hardware.lora={str(lora).lower()}", "hardware.lora_r=4"])
    tok = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    reference = None if lora else AutoModelForCausalLM.from_pretrained(folder)
    if lora:
        policy = wrap_lora(policy, cfg.model, cfg.hardware)
    critic = AutoModelForTokenClassification.from_pretrained(folder, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    reward_model.config.pad_token_id = tok.pad_token_id
    return PPOTrainer(cfg, policy, critic, reward_model, tok, PROMPTS, None, Accelerator(cpu=True),
                      reference=reference, model_path=folder)


def _engine_weights_equal_the_policys(trainer) -> None:
    from rlhf_exp.models import merged_lora_weights

    policy = trainer.engines.bare_policy()
    config = policy.peft_config["default"] if hasattr(policy, "peft_config") else None
    expected = dict(merged_lora_weights(policy.named_parameters(), config))
    engine = trainer.rollout_engine.llm.loader.params
    # every weight of the engine's model came from the policy (a tied head through its embeddings)
    assert set(expected) == set(engine)
    for name, tensor in expected.items():
        assert torch.allclose(engine[name], tensor, atol=1e-6), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_vllm_engine_gets_the_policys_weights_before_each_rollout_and_ppo_scores_its_answers(
        scaled_model, compose, fake_vllm, lora):
    """Built with placeholder weights; before the first rollout and after each update the policy's weights (LoRA merged,
    the training copy untouched) are loaded into it; its answers' log-probabilities come from a forward of the policy
    and agree with the engine's own (the same fp32 weights: the gap is rounding); seeds follow the prompt's row."""
    folder = scaled_model("qwen2_5")
    trainer = _trainer(compose, folder, lora)
    assert trainer.rollout_engine.llm is None  # built at the first rollout, outside the models' loading context
    assert not trainer.logprobs_from_generation  # a forward of the trained policy scores vLLM's answers
    before = {n: p.detach().clone() for n, p in trainer.engines.bare_policy().named_parameters()}
    rng = torch.get_rng_state()

    first = trainer.step()
    llm = trainer.rollout_engine.llm
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["generation_config"] == "vllm" and llm.kwargs["skip_tokenizer_init"]
    assert torch.equal(torch.get_rng_state(), rng)  # vLLM reseeded the process as it started: put back
    assert first["time/weight_sync"] > 0 and first["time/policy_forward"] > 0
    assert first["rollout/engine_logprob_gap"] < 1e-4
    assert llm.calls[:2] == ["reset_prefix_cache", "generate"]
    after = dict(trainer.engines.bare_policy().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the update changed the policy ...
    if lora:  # ... its adapters only: merging for the engine left the base weights as they were
        assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)

    rollout, _ = trainer.rollout()  # ... so the engine receives it again first
    _engine_weights_equal_the_policys(trainer)
    assert llm.calls.count("reset_prefix_cache") == 2
    assert trainer.engine_gap < 1e-4
    answers = rollout.input_ids[:, rollout.prompt_len:]
    assert rollout.mask.sum() > 0 and (rollout.logprobs * rollout.mask).sum() < 0

    # each answer's draws depend on its row and the step only: the second half alone samples what it sampled in the
    # whole (exactly so here, each row alone in fp32; real vLLM batches rows in bf16, so a near-tie draw may differ)
    step_seed = trainer.seed * 1_000_003 + trainer.steps_done
    ids, attn = rollout.input_ids[2:, :rollout.prompt_len], rollout.attention_mask[2:, :rollout.prompt_len]
    half, _ = trainer.rollout_engine.generate(ids, attn, [r[a.bool()].tolist() for r, a in zip(ids, attn)],
                                              SeededSampler(1.0, step_seed, slice(2, 4), 4, "cpu"))
    width = min(half.shape[1] - rollout.prompt_len, answers.shape[1])
    assert torch.equal(half[:, rollout.prompt_len:][:, :width], answers[2:, :width])


def test_the_vllm_engine_sleeps_between_rollouts_with_vllm_sleep(scaled_model, compose, fake_vllm):
    folder = scaled_model("qwen2_5")
    trainer = _trainer(compose, folder, lora=False)
    trainer.phase.vllm_sleep = True
    from rlhf_exp.ppo.rollout_engines import VLLMEngine

    engine = VLLMEngine(trainer.engines.cfg, trainer.engines, trainer.tokenizer, folder)
    trainer.rollout_engine = engine
    trainer.rollout()
    trainer.rollout()  # no update in between: the weights were freed, so they are loaded again
    assert trainer.engine_gap < 1e-4  # (the fake's level-2 sleep overwrites its weights with NaN)
    assert engine.llm.calls == ["sleep2", *(["wake_up:weights", "reset_prefix_cache", "wake_up:kv_cache", "generate",
                                             "sleep2"] * 2)]


@pytest.mark.slow
def test_zero3_processes_gather_the_merged_lora_weights_a_rollout_engine_loads(tmp_path):
    """Under ZeRO-3 each process holds a partition; the weights the vllm engine is given are whole on every process,
    adapters merged, equal to peft's merge of an unpartitioned copy (the FSDP2 gather: tests/launch/
    test_broadcast_loading.py)."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "tests" / "ppo" / "weights_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert 0 < r["held"] < 0.6 * r["total"] and not r["missing"] and not r["extra"], ranks
        assert r["max_abs_diff"] < 1e-6 and r["merge_moved"] > 1e-3 and r["merged_layers"] > 0, ranks
