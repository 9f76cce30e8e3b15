"""Rollouts are sampled from exactly the distribution whose log-probabilities PPO's update uses: the
checkpoint's own generation config (repetition penalty, top-k, ...) plays no part, top-p is refused, and
every forward counts positions over real tokens (left-padded prompts)."""

from __future__ import annotations

import pytest
import torch

from rlhf_exp.data.encode import pad, prompt_ids
from rlhf_exp.data.synthetic import chat_prompt
from rlhf_exp.ppo.trainer import SeededSampler, sample, token_logprobs

PROMPTS = [chat_prompt("3 1 4 1 5 ="), chat_prompt("9 9 9 9 9 ="), chat_prompt("2 7 1 8 2 =")]


def rollout(folder, seed: int = 3, temperature: float = 1.0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, attn = pad([prompt_ids(tok, p) for p in PROMPTS], tok.pad_token_id, side="left")
    sampler = SeededSampler(temperature, seed, slice(0, len(PROMPTS)), len(PROMPTS), "cpu")
    with torch.no_grad():
        out = sample(model, tok, ids, attn, sampler, max_new_tokens=12)
    return model, tok, ids, attn, out


def test_the_checkpoints_generation_config_changes_nothing(scaled_model):
    """Same weights; one checkpoint ships Qwen2.5 Instruct's repetition_penalty=1.05, top_k=20, top_p=0.8,
    the other repetition_penalty=1.3 and top_k=2: the sampled answers are identical."""
    plain = scaled_model("qwen2_5")
    penalised = scaled_model("qwen2_5", generation_config={"repetition_penalty": 1.3, "top_k": 2})
    a, b = rollout(plain)[-1], rollout(penalised)[-1]
    assert torch.equal(a, b)


def test_each_sampled_token_follows_the_softmax_ppo_scores(scaled_model):
    """Replaying the sampler's uniform numbers against the full forward pass's softmax(logits / T) picks
    every token the rollout picked: the old log-probabilities describe the sampling exactly."""
    model, tok, ids, attn, out = rollout(scaled_model("qwen2_5", generation_config={"repetition_penalty": 1.3}),
                                         temperature=0.7)
    prompt_len = ids.shape[1]
    mask = torch.cat([attn, torch.ones_like(out[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
    replay = SeededSampler(0.7, 3, slice(0, len(PROMPTS)), len(PROMPTS), "cpu")
    for t in range(prompt_len, out.shape[1]):
        picked = replay(None, logits[:, t - 1]).argmax(-1)
        running = (out[:, prompt_len:t] != tok.eos_token_id).all(1)  # rows still generating
        assert torch.equal(picked[running], out[running, t]), t


def test_left_padding_leaves_log_probabilities_unchanged_for_absolute_positions():
    """GPT-2 (learned absolute position embeddings): a left-padded row gets the log-probabilities it has
    alone, because positions are counted over real tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]  # prompt of 3 / 6, answer of 3
    answer = 3
    ids, attn = pad(rows, pad_id=0, side="left")
    with torch.no_grad():
        batched, _ = token_logprobs(model, ids, attn, ids.shape[1] - answer, temperature=1.0)
        for row, seq in enumerate(rows):
            one = torch.tensor([seq])
            alone, _ = token_logprobs(model, one, torch.ones_like(one), len(seq) - answer, temperature=1.0)
            assert torch.allclose(batched[row], alone[0], atol=1e-5), (batched[row], alone[0])


def test_top_p_is_refused_for_ppo_with_the_reason(compose):
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.config.validate import validate

    with pytest.raises(ConfigError, match=r"phase.top_p=0.9: PPO samples from the full distribution whose "
                                          r"log-probabilities its update uses"):
        validate(compose(["phase=ppo", "phase.top_p=0.9"]))
