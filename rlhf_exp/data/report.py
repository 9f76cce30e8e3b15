"""What the trainer made of the data: records kept, cut or dropped for length, and a preview.

Counted from the datasets TRL prepared (``trainer.train_dataset`` / ``eval_dataset``), so the numbers
are what training used, by each trainer's own rule (TRL 1.16):

* SFT keeps the first ``max_length`` tokens of a record (``truncation_mode=keep_start``) and, with the
  loss on answers only, drops a record left with no answer token. Cut records are counted as those that
  reach ``max_length`` (a record exactly that long counts too: the prepared data no longer tells them
  apart). Packed (``phase.packing``): the records' lengths inside the bins (``seq_lengths``).
* RM drops a pair whose chosen or rejected sequence is longer than ``max_length``.
* DPO drops a pair whose prompt alone fills ``max_length``, and its collator cuts prompt + answer to
  ``max_length`` (counted exactly: the prepared data still hold the whole sequences).
"""

from __future__ import annotations

from typing import Any

PREVIEW_RECORDS = 5


def id_columns(dataset) -> list[str]:
    return [c for c in dataset.column_names if c.endswith("ids") and c not in ("token_type_ids", "position_ids")]


def length_counts(phase: str, raw_count: int, prepared, max_length: int) -> dict[str, int]:
    """{"of", "dropped", "truncated"} of one split, from the raw record count and TRL's prepared set."""
    kept = len(prepared)
    counts = {"of": raw_count, "dropped": raw_count - kept, "truncated": 0}
    if phase == "sft" and "seq_lengths" in prepared.column_names:  # packed: rows are bins of whole records
        lengths = [n for row in prepared["seq_lengths"] for n in row]
        counts.update(dropped=raw_count - len(lengths), truncated=sum(1 for n in lengths if n >= max_length))
    elif phase == "sft":
        counts["truncated"] = sum(1 for ids in prepared["input_ids"] if len(ids) >= max_length)
    elif phase == "dpo":
        prompts, chosen, rejected = prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]
        counts["truncated"] = sum(1 for p, c, r in zip(prompts, chosen, rejected) if len(p) + max(len(c), len(r)) > max_length)
    return counts


RULES = {
    "sft": "SFT keeps the first phase.max_length={n} tokens of a record (and drops one with no answer token left)",
    "rm": "RM drops pairs longer than phase.max_length={n} tokens",
    "dpo": "DPO drops pairs whose prompt fills phase.max_length={n} and cuts the rest to it",
}


def report_trainer_data(run, phase: str, trainer, raw_train: int, raw_eval: int | None, max_length: int) -> None:
    """Length counts of the train and eval splits into the run's summary, and data_preview.jsonl."""
    rule = RULES[phase].format(n=max_length)
    for split, raw, prepared in (("train", raw_train, trainer.train_dataset), ("eval", raw_eval, trainer.eval_dataset)):
        if prepared is None or raw is None or isinstance(prepared, dict):
            continue
        counts = length_counts(phase, raw, prepared, max_length)
        run.count_length(split, total=counts["of"], dropped=counts["dropped"], truncated=counts["truncated"], rule=rule)
    run.write_preview(preview(trainer.train_dataset, trainer.processing_class))


def preview(dataset, tokenizer, n: int = PREVIEW_RECORDS) -> list[dict[str, Any]]:
    """The first ``n`` records as token ids the trainer feeds: each ids column decoded (special tokens
    kept, so BOS/EOS and the chat template show) with its token count."""
    rows = []
    columns = id_columns(dataset)
    for i in range(min(n, len(dataset))):
        record = dataset[i]
        rows.append({"record": i, **{column: {"text": tokenizer.decode(record[column]), "tokens": len(record[column])}
                                     for column in columns}})
    return rows


def preview_prompts(prompt_ids: list[list[int]], tokenizer, n: int = PREVIEW_RECORDS) -> list[dict[str, Any]]:
    """PPO: the first prompts as the policy generates from them."""
    return [{"record": i, "prompt_ids": {"text": tokenizer.decode(ids), "tokens": len(ids)}}
            for i, ids in enumerate(prompt_ids[:n])]
