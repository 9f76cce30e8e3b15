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
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # Llama/Mistral have none
    ids, attn = pad([prompt_ids(tok, p) for p in PROMPTS], pad_id, side="left")
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


@pytest.mark.parametrize("family", ["llama3_1", "mistral_v03", "qwen2_5"])
def test_log_probabilities_from_the_kept_logits_equal_the_full_forwards(scaled_model, family):
    """token_logprobs runs the LM head on the answer's positions only (logits_to_keep): the log-probabilities and
    entropies equal those of the full logits, on each real architecture with its tokenizer and chat template."""
    model, _, ids, attn, out = rollout(scaled_model(family))
    prompt_len = ids.shape[1]
    mask = torch.cat([attn, torch.ones_like(out[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, prompt_len - 1:-1].float()
        logp = torch.log_softmax(logits, -1)
        full = logp.gather(2, out[:, prompt_len:, None])[..., 0]
        kept, entropy = token_logprobs(model, out, mask, prompt_len, temperature=1.0)
        alone, none = token_logprobs(model, out, mask, prompt_len, temperature=1.0, entropy=False)
    assert torch.allclose(kept, full, atol=1e-5) and torch.equal(kept, alone) and none is None
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_samplers_log_probabilities_equal_a_forwards_in_fp32(scaled_model, temperature):
    """phase.rollout_logprobs=generate: the log-probabilities and entropies the sampler records from generate()'s
    logits (KV cache, one position at a time) equal a full forward's over prompt and answer to float rounding in
    fp32 (Qwen2.5's architecture, left-padded prompts), so PPO's first ratio is 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = scaled_model("qwen2_5")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, attn = pad([prompt_ids(tok, p) for p in PROMPTS], tok.pad_token_id, side="left")
    sampler = SeededSampler(temperature, 5, slice(0, len(PROMPTS)), len(PROMPTS), "cpu", record=True)
    with torch.no_grad():
        out = sample(model, tok, ids, attn, sampler, max_new_tokens=12)
        prompt_len = ids.shape[1]
        recorded, recorded_entropy = sampler.recorded(out.shape[1] - prompt_len)
        mask = torch.cat([attn, torch.ones_like(out[:, prompt_len:])], dim=1)
        forward, entropy = token_logprobs(model, out, mask, prompt_len, temperature)
    running = torch.cat([torch.ones_like(out[:, :1], dtype=torch.bool),
                         (out[:, prompt_len:-1] != tok.eos_token_id).cumprod(1).bool()], dim=1)  # up to the EOS
    assert recorded.shape == forward.shape and running.sum() > len(PROMPTS)
    assert torch.allclose(recorded[running], forward[running], atol=2e-6, rtol=0)
    assert torch.allclose(recorded_entropy[running], entropy[running], atol=0, rtol=2e-6)  # ~6.9 nats: relative


def test_log_probabilities_come_from_generation_only_where_exact():
    """phase.rollout_logprobs=auto: from the sampler in full fp32, from a forward in half precision or quantized."""
    from types import SimpleNamespace

    from rlhf_exp.ppo.trainer import logprobs_from_generation

    def hw(precision="fp32", q4=False):
        return SimpleNamespace(precision=precision, load_in_4bit=q4, load_in_8bit=False)

    phase = SimpleNamespace(rollout_logprobs="auto")
    assert logprobs_from_generation(phase, hw())
    assert not logprobs_from_generation(phase, hw("bf16")) and not logprobs_from_generation(phase, hw(q4=True))
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        assert not logprobs_from_generation(phase, hw())
    finally:
        torch.set_float32_matmul_precision(previous)
    assert logprobs_from_generation(SimpleNamespace(rollout_logprobs="generate"), hw("bf16"))
    assert not logprobs_from_generation(SimpleNamespace(rollout_logprobs="forward"), hw())


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


@pytest.mark.parametrize("family", ["llama3_1", "qwen2_5"])
def test_a_batch_cut_to_the_columns_it_needs_scores_its_answers_as_the_whole(scaled_model, family):
    """PPO's forwards run on each micro-batch cut to its own columns (ppo.trainer.trimmed: shared left padding and
    answer columns after every answer ended): the answers' log-probabilities and values are those of the whole
    rollout's width, on prompts of different lengths whose answers end at different tokens."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from rlhf_exp.ppo.core import response_mask
    from rlhf_exp.ppo.trainer import token_values, trimmed, widened

    folder = scaled_model(family)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [chat_prompt("3 1 4 1 5 9 2 6 ="), chat_prompt("9 ="), chat_prompt("2 7 1 8 =")]  # different lengths
    ids, attn = pad([prompt_ids(tok, p) for p in prompts], pad_id, side="left")
    assert len(set(attn.sum(1).tolist())) == 3
    prompt_len = ids.shape[1]
    # answers of ordinary tokens that end at different places: EOS at 3 and 6 in rows 0 and 1, row 2 runs to the end
    answers = torch.randint(100, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    answers[0, 2], answers[1, 5] = tok.eos_token_id, tok.eos_token_id
    out = torch.cat([ids, answers], dim=1)
    mask = response_mask(answers, tok.eos_token_id)
    full = torch.cat([attn, mask.long()], dim=1)
    critic = AutoModelForTokenClassification.from_pretrained(scaled_model(family), num_labels=1).eval()
    for rows in (slice(0, 2), slice(0, 3), slice(1, 2)):
        cut_ids, cut_attn, cut_prompt, width = trimmed(out[rows], full[rows], prompt_len, mask[rows])
        assert width == int(mask[rows].sum(1).max()) and cut_ids.shape[1] <= out.shape[1]
        m = mask[rows].bool()
        with torch.no_grad():
            whole, _ = token_logprobs(model, out[rows], full[rows], prompt_len, 1.0, entropy=False)
            cut, _ = token_logprobs(model, cut_ids, cut_attn, cut_prompt, 1.0, entropy=False)
            values = token_values(critic, out[rows], full[rows], prompt_len)
            cut_values = token_values(critic, cut_ids, cut_attn, cut_prompt)
        assert torch.allclose(widened(cut, whole.shape[1])[m], whole[m], atol=1e-5)
        assert torch.allclose(widened(cut_values, whole.shape[1])[m], values[m], atol=1e-5)
    # the shortest prompt's row alone loses its left padding, and the columns after its answer's EOS
    _, _, alone_prompt, alone_width = trimmed(out[1:2], full[1:2], prompt_len, mask[1:2])
    assert alone_prompt == int(attn[1].sum()) < prompt_len and alone_width == 6
    _, _, both_prompt, both_width = trimmed(out[:2], full[:2], prompt_len, mask[:2])
    assert both_prompt == prompt_len and both_width == 6  # row 0 has the longest prompt
