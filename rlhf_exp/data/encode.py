"""Token ids of prompts and answers exactly as TRL's trainers make them, for everything that is not a
TRL trainer: PPO's rollouts and reward scores, the gold evaluation, the data preview and length counts.

A policy must generate from the ids it was fine-tuned on, and a reward model must score the ids it
was trained on, or both see sequences they never saw (a second BOS when a rendered chat is tokenized
again with special tokens; a score read at another position when the template's tail is left off).
So the rules below are TRL 1.16's own (``trl.data_utils._tokenize`` as SFTTrainer, DPOTrainer and
RewardTrainer call it), and ``tests/data/test_encode.py`` checks them against those trainers' datasets
for each preset's chat template:

* conversational prompt (a list of messages): ``apply_chat_template(prompt, add_generation_prompt=True,
  tokenize=True)``: the template writes BOS itself; nothing is added.
* plain prompt (a string): ``tokenizer(prompt)``, special tokens (BOS) added as the tokenizer does.
* a scored answer, conversational: ``apply_chat_template(prompt + [assistant message])``: the whole
  turn with the template's tail (Qwen's ``<|im_end|>\\n``), as RewardTrainer tokenizes chosen/rejected.
* a scored answer, plain: ``tokenizer(prompt + answer + eos)``.

PPO scores its own samples: a chat answer as its text re-rendered through the template (what
RewardTrainer saw; the template's tail included), a plain answer as the prompt's ids followed by the
sampled ids (equal to ``tokenizer(prompt + answer + eos)`` when the tokenizer splits the two at their
boundary, as the embedded one does; a BPE tokenizer may merge across it). An answer cut off by
``max_new_tokens`` gets no end of turn in either case.
"""

from __future__ import annotations

from typing import Any


def is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Ids a policy generates from, as SFT and DPO preprocessing tokenize the prompt."""
    if is_chat(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def answer_messages(answer: str | list[dict]) -> list[dict]:
    return answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]


def scored_ids(tokenizer, prompt: str | list[dict], answer: str | list[dict], finished: bool = True) -> list[int]:
    """Ids a reward model scores for (prompt, answer), as RewardTrainer tokenizes a chosen/rejected answer.
    ``finished=False`` (an answer cut off by max_new_tokens): no end of turn is added, for chat prompts
    (the template's ``continue_final_message``) as for plain ones (no EOS), so a cut-off answer is never
    scored as if it had ended."""
    if is_chat(prompt):
        return list(tokenizer.apply_chat_template(prompt + answer_messages(answer), tokenize=True, return_dict=True,
                                                  continue_final_message=not finished)["input_ids"])
    text = prompt + answer
    if finished and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


# SFTTrainer tokenizes prompt + completion exactly as RewardTrainer tokenizes prompt + chosen
sft_ids = scored_ids


def pad(sequences: list[list[int]], pad_id: int, side: str):
    """Pad to the longest; returns (input_ids, attention_mask) tensors. ``side`` "left" for generation."""
    import torch

    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        where = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[row, where] = torch.tensor(seq, dtype=torch.long)
        mask[row, where] = 1
    return ids, mask


def position_ids(attention_mask):
    """Positions counted over real tokens only, so a left-padded row has the positions it would have
    alone (generate() does the same; a plain forward would count the padding: wrong for absolute
    position embeddings, and RoPE only up to rounding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
