"""Gold-score evaluation on the embedded task: greedy answers to held-out prompts, scored by gold.

Used by every policy phase for evaluation only; the gold reward is never a training signal here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_exp.data.synthetic import gold_reward


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    desc: str = "generate") -> list[str]:
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every prompt
    answers: list[str] = []
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def gold_score(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
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
def reward_scores(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int) -> torch.Tensor:
    """Scalar reward of each (prompt, answer), scored as the trainer saw them: prompt + answer + EOS."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, answers)]
    scores = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=True).to(device)
            scores.append(model(**batch).logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)
