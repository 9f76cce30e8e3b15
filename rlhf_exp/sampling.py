"""Sampling that PPO's log-probabilities describe exactly, shared by PPO's rollouts and the held-out evaluations
of PPO and DPO (``rlhf_exp.heldout``): a seeded sampler reproducible across process counts, generation with our
settings only, and the log-probabilities and entropies of the answer tokens.
"""

from __future__ import annotations

import torch

from rlhf_exp.data.encode import position_ids
from rlhf_exp.evaluation import own_generation_config


def token_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float, entropy: bool = True):
    """Log-probabilities (and entropies, or None with ``entropy=False``) of the response tokens under ``model``,
    positions counted over real tokens (the prompts are left-padded), as generate() counted them. The LM head runs
    on the positions that predict response tokens only (``logits_to_keep``): with a 128k vocabulary its logits over
    the prompt would cost more than the rest of the forward on a short answer."""
    response = input_ids.shape[1] - prompt_len
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=response + 1).logits[:, -response - 1:-1].float()
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = torch.gather(logp_all, 2, input_ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    return logprobs, entropy_of(logp_all)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution over the last dimension, given its log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling at ``temperature`` (inverse-CDF
    sampling with one uniform number per row and token) from a generator seeded per PPO step. The
    numbers are drawn for the whole rollout batch and each process uses the rows of its own prompts,
    so a prompt's answer is the same whichever process generated it and however many there are: a
    2-process run samples exactly what 1 process samples, and rollouts are reproducible from the seed.
    It samples from softmax(logits / temperature), the distribution ``token_logprobs`` scores: no
    top-p/top-k truncation (refused by validate) and no processor from the checkpoint's generation
    config (``own_generation_config``), so PPO's old log-probabilities describe the sampler exactly."""

    def __init__(self, temperature: float, seed: int, rows: slice, total_rows: int, device, record: bool = False):
        self.temperature, self.rows, self.total_rows, self.seed = temperature, rows, total_rows, seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # with record: each picked token's log-probability and each position's entropy, as token_logprobs gives them
        self.record = record
        self.logprobs: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)
        u = torch.rand(self.total_rows, generator=self.generator, device=self.generator.device)[self.rows]
        pick = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
        if self.record:
            logp = torch.log_softmax(logits, dim=-1)
            self.logprobs.append(logp.gather(-1, pick).squeeze(-1))
            self.entropies.append(entropy_of(logp))
        # greedy decoding then takes exactly the sampled token
        return torch.full_like(scores, float("-inf")).scatter(-1, pick, 0.0)

    def recorded(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded log-probabilities and entropies, [rows, width]: one column per generated token, zeros past
        the tokens this process generated (others may have generated longer)."""
        logprobs, entropies = torch.stack(self.logprobs, dim=1), torch.stack(self.entropies, dim=1)
        pad = width - logprobs.shape[1]
        return torch.nn.functional.pad(logprobs, (0, pad)), torch.nn.functional.pad(entropies, (0, pad))


def sample(model, tokenizer, input_ids, attention_mask, sampler: SeededSampler, max_new_tokens: int,
           generation: dict | None = None, **kwargs):
    """Prompt + sampled answer ids: greedy decoding over the sampler's one-hot logits, with no processor
    of the checkpoint's own generation config (repetition penalty, top-k, ...) in between. ``generation``: more
    generation-config settings (the KV cache and its compilation: ``rollout_engines.generation_settings``)."""
    from transformers import LogitsProcessorList

    with own_generation_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens,
                               **(generation or {})) as config:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              logits_processor=LogitsProcessorList([sampler]), **kwargs)
