"""The datasets each phase trains on, whatever the source (embedded task, hub, local JSONL)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rlhf_exp.config.schema import DataConfig


@dataclass
class PhaseData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    # held-out prompts scored with the gold reward (embedded task only)
    eval_prompts: list[str] | None = None
    # gold rewards (chosen, rejected) of each eval pair (embedded task only), for RM accuracy against gold
    eval_pair_golds: list[tuple[float, float]] | None = None


@lru_cache(maxsize=4)
def _synthetic(syn_key: tuple, seed: int) -> dict:
    from types import SimpleNamespace

    from rlhf_exp.data.synthetic import build_task_data

    return build_task_data(SimpleNamespace(**dict(syn_key)), seed)


def synthetic_splits(data: DataConfig) -> dict:
    from dataclasses import asdict

    return _synthetic(tuple(sorted(asdict(data.synthetic).items())), data.seed)


def sft_data(data: DataConfig) -> PhaseData:
    from datasets import Dataset

    if data.source == "synthetic":
        splits = synthetic_splits(data)
        return PhaseData(Dataset.from_list(splits["sft_train"]), Dataset.from_list(splits["sft_eval"]),
                         splits["eval_prompts"])
    from rlhf_exp.data.sources import load_sft

    train, evaluation = load_sft(data, data.seed)
    return PhaseData(train, evaluation)


def preference_data(data: DataConfig) -> PhaseData:
    from datasets import Dataset

    if data.source == "synthetic":
        splits = synthetic_splits(data)

        def rows(pairs):
            return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]

        return PhaseData(Dataset.from_list(rows(splits["pref_train"])), Dataset.from_list(rows(splits["pref_eval"])),
                         splits["eval_prompts"], [(p.gold_chosen, p.gold_rejected) for p in splits["pref_eval"]])
    from rlhf_exp.data.sources import load_preferences

    train, evaluation = load_preferences(data, data.seed)
    return PhaseData(train, evaluation)
