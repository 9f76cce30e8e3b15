"""Evaluation with the embedded task's gold reward (greedy answers to held-out prompts) and reward-model
scores, on the same token ids the trainers use (``rlhf_exp.data.encode``).

Used by every policy phase for evaluation only; the gold reward is never a training signal here.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_exp.data.encode import pad, position_ids, prompt_ids, scored_ids
from rlhf_exp.data.synthetic import gold_reward


@contextmanager
def own_generation_config(model, tokenizer, **settings):
    """Generation with our settings only. generate() fills every setting it is not given from the
    checkpoint's own generation_config.json (Qwen2.5 Instruct ships repetition_penalty=1.05, top_k=20,
    top_p=0.8; save_pretrained carries it into every later checkpoint), which would change what is
    evaluated and, in PPO, sample from another distribution than the one whose log-probabilities the
    update uses. So the model's generation config is replaced by a blank one for the call."""
    from transformers import GenerationConfig

    config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, **settings)
    # the modules that own one (a peft wrapper only reaches through to its base model's)
    saved = [(m, m.generation_config) for m in model.modules() if vars(m).get("generation_config") is not None]
    for module, _ in saved:
        module.generation_config = config
    try:
        yield config
    finally:
        for module, original in saved:
            module.generation_config = original


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
                    desc: str = "generate") -> list[str]:
    """Greedy answers (text, special tokens removed) to prompts given as strings or message lists."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    device = next(model.parameters()).device
    try:
        with own_generation_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens) as config:
            for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
                ids, mask = pad([prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]],
                                tokenizer.pad_token_id, side="left")  # generation continues from the right edge
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
                answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def gold_score(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
               samples_path: Path | None = None, desc: str = "gold eval") -> float:
    """Mean gold reward of greedy answers; writes a few (prompt, answer, gold) rows when asked."""
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, desc=desc)
    golds = [gold_reward(p, a) for p, a in zip(prompts, answers)]
    if samples_path is not None:
        with open(samples_path, "w") as f:
            for p, a, g in list(zip(prompts, answers, golds))[:50]:
                f.write(json.dumps({"prompt": p, "answer": a.strip(), "gold": g}) + "\n")
    return sum(golds) / len(golds)


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: list, answers: list, batch_size: int) -> torch.Tensor:
    """Scalar reward of each (prompt, answer), on the ids RewardTrainer trained on: strings (prompt + answer
    + EOS) or chat messages (the whole conversation through the chat template)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [scored_ids(tokenizer, p, a) for p, a in zip(prompts[start:start + batch_size],
                                                               answers[start:start + batch_size])]
            scores.append(score_ids(model, rows, tokenizer.pad_token_id, device))
    finally:
        model.train(was_training)
    return torch.cat(scores)


def score_ids(model, rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Reward-model scores of token sequences, right-padded as RewardTrainer's collator pads them (the
    model reads the score at the last non-pad token)."""
    ids, mask = pad(rows, pad_id, side="right")
    ids, mask = ids.to(device), mask.to(device)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0].float().cpu()
