"""The datasets each phase trains on, whatever the source (embedded task, hub, local JSONL)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rlhf_exp.config.schema import DataConfig


@dataclass
class PhaseData:
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset | None"  # noqa: F821
    # held-out prompts scored with the gold reward (embedded task only; message lists in the chat form)
    eval_prompts: list | None = None
    # gold rewards (chosen, rejected) of each eval pair (embedded task only), for RM accuracy against gold
    eval_pair_golds: list[tuple[float, float]] | None = None


@lru_cache(maxsize=4)
def _synthetic(syn_key: tuple, seed: int) -> dict:
    from types import SimpleNamespace

    from rlhf_exp.data.synthetic import build_task_data

    return build_task_data(SimpleNamespace(**dict(syn_key)), seed)


def plain_settings(section) -> dict:
    """A config section (the dataclass, or a composed DictConfig) as plain values."""
    from dataclasses import asdict, is_dataclass

    from omegaconf import OmegaConf

    return asdict(section) if is_dataclass(section) else OmegaConf.to_container(section, resolve=True)


def synthetic_key(data) -> tuple | None:
    """The cache key of the embedded task's examples for a data config (the dataclass or a composed DictConfig):
    its settings but the form (both forms are the same examples) and the seed; None for other data sources. Plain
    values only, so a key survives JSON (``warm_synthetic``)."""
    if str(data.source) != "synthetic":
        return None
    task = plain_settings(data.synthetic)
    plain = lambda v: v.value if hasattr(v, "value") else v  # noqa: E731  (enums as their values)
    settings = tuple(sorted((k, plain(v)) for k, v in task.items() if k != "form"))
    return settings, int(data.seed)


def warm_synthetic(keys) -> None:
    """Build the embedded task for each key (``synthetic_key``) into this process's cache: processes forked from it
    afterwards (the pipeline's phases, rlhf_exp.launch.preload) find the examples built instead of building them
    again, each phase."""
    for settings, seed in keys:
        _synthetic(tuple(tuple(item) for item in settings), int(seed))


def synthetic_splits(data: DataConfig) -> dict:
    from rlhf_exp.data.synthetic import chat_form

    splits = _synthetic(*synthetic_key(data))
    return chat_form(splits) if str(data.synthetic.form) == "chat" else splits


def pair_rows(pairs) -> list[dict]:
    """The embedded task's preference pairs as the records trainers read (gold kept aside)."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def generated_counts(counts: dict | None, train: int, eval_: int) -> None:
    """Counts of the embedded task's splits: generated, so nothing is dropped."""
    if counts is not None:
        counts.update(train={"loaded": train, "kept": train}, eval={"loaded": eval_, "kept": eval_})


def sft_data(data: DataConfig, counts: dict | None = None) -> PhaseData:
    """Demonstrations; ``counts`` (when given) receives what was read and dropped per split."""
    from datasets import Dataset

    if data.source == "synthetic":
        splits = synthetic_splits(data)
        generated_counts(counts, len(splits["sft_train"]), len(splits["sft_eval"]))
        return PhaseData(Dataset.from_list(splits["sft_train"]), Dataset.from_list(splits["sft_eval"]),
                         splits["eval_prompts"])
    from rlhf_exp.data.sources import load_sft

    train, evaluation = load_sft(data, data.seed, counts=counts)
    return PhaseData(train, evaluation)


def preference_data(data: DataConfig, counts: dict | None = None) -> PhaseData:
    """Preference pairs; ``counts`` (when given) receives what was read and dropped per split."""
    from datasets import Dataset

    if data.source == "synthetic":
        splits = synthetic_splits(data)

        generated_counts(counts, len(splits["pref_train"]), len(splits["pref_eval"]))
        return PhaseData(Dataset.from_list(pair_rows(splits["pref_train"])), Dataset.from_list(pair_rows(splits["pref_eval"])),
                         splits["eval_prompts"], [(p.gold_chosen, p.gold_rejected) for p in splits["pref_eval"]])
    from rlhf_exp.data.sources import load_preferences

    train, evaluation = load_preferences(data, data.seed, counts=counts)
    return PhaseData(train, evaluation)


def library_versions() -> str:
    """The versions of what turns rows into token ids (datasets' cache keys a map by the function's name, not its
    code: after an upgrade, kept results must not be read back)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("datasets", "pyarrow", "trl", "transformers", "tokenizers", "jinja2"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return ";".join(out)


def on_disk(dataset: "datasets.Dataset | None") -> "datasets.Dataset | None":  # noqa: F821
    """``dataset`` backed by a file in datasets' cache, so that what is computed from it there (TRL's trainers
    tokenise their data with ``Dataset.map``) is kept beside it and read back by the next run on the same rows: a
    sweep job, a rerun, a phase of another pipeline on the same data. A set read through ``datasets.load_dataset``
    (data.source=hub, local hub-layout files) is backed by its files already; one built in memory (the embedded
    task, data.source=jsonl) is written once, in a folder named by the digest of its rows (Arrow's own bytes,
    column types included) and of the library versions (``library_versions``), so equal rows under the same
    libraries always find the same file and nothing else does. Returned as it is when datasets' caching is off,
    or the cache cannot be written or read."""
    import hashlib
    import logging
    from pathlib import Path

    import datasets

    if dataset is None or dataset.cache_files or not datasets.is_caching_enabled():
        return dataset
    import pyarrow as pa

    from rlhf_exp.tracking.run import write_bytes_atomic

    # the rows the set shows (a held-out split or a cap is a view), without datasets' metadata (its fingerprint)
    table = dataset.with_format("arrow")[:].replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # datasets' own file format: an Arrow stream
        writer.write_table(table)
    content = sink.getvalue()
    digest = hashlib.sha256(content)
    digest.update(library_versions().encode())
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "rlhf_exp_data" / digest.hexdigest()[:40]
    path = folder / "data.arrow"
    try:
        damaged = path.is_file() and path.stat().st_size != content.size  # cut short (written by hand, a bad disk)
        if damaged or not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, content, keep_existing=not damaged)
        return datasets.Dataset.from_file(str(path), info=dataset.info.copy(), split=dataset.split)
    except (OSError, pa.ArrowException, ValueError) as exc:
        logging.getLogger(__name__).warning("data kept in memory, not in %s (%s: %s)", folder, type(exc).__name__, exc)
        return dataset


def held_out_prompts(data: PhaseData) -> list:
    """Held-out prompts of a phase's data: the embedded task's gold prompts, else the eval split's prompts (each
    once, in order); empty when there is neither."""
    import json

    if data.eval_prompts:
        return list(data.eval_prompts)
    if data.eval is None or "prompt" not in data.eval.column_names:
        return []
    return list({json.dumps(p, sort_keys=True): p for p in data.eval["prompt"]}.values())
