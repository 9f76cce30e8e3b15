"""Hub and local (JSON Lines) data, normalised to TRL's prompt-completion and preference formats.

Every loader returns ``(train, eval)`` ``datasets.Dataset`` objects with fixed columns:

* SFT (``load_sft``): ``prompt``, ``completion``.
* RM/DPO/PPO (``load_preferences``): ``prompt``, ``chosen``, ``rejected``.

A data set comes out either *standard* (every column a string) or *conversational* (``prompt`` a
list of ``{"role", "content"}`` messages up to, not including, the final assistant turn; each answer
column a one-message list holding that final assistant turn). TRL's SFTTrainer, RewardTrainer and
DPOTrainer accept both and apply the chat template to the conversational kind. Messages keep only
``role`` and ``content``.

Source layouts (``data.format``; source column names come from ``data.columns.<field>``):

* ``hh`` (Anthropic/hh-rlhf): ``chosen``/``rejected`` are full transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing every turn but the last. The shared turns are
  the prompt; SFT trains on the chosen transcript's final assistant turn.
* ``preference`` (e.g. HuggingFaceH4/ultrafeedback_binarized): ``prompt`` + ``chosen`` +
  ``rejected``, strings or chat lists. Leading messages the two answers share (UltraFeedback repeats
  the user turn in both) move into the prompt. SFT uses ``messages`` when that column exists, else
  prompt + chosen.
* ``messages``: one chat list per record (SFT only).
* ``prompt_completion``: ``prompt`` + ``completion`` (SFT only).
* multi-annotator pairs (any preference layout above, one extra column): ``labels``, a list of each
  annotator's pick for the pair, ``"chosen"``, ``"rejected"``, ``"tie"`` or ``null`` (not labelled by that
  annotator); annotator i is position i in every row. Training reads chosen/rejected as they are (the data
  set's own label, e.g. the majority's) and ignores ``labels``; ``python -m rlhf_exp.data check`` measures
  agreement from them (percent agreement, Cohen's and Fleiss' kappa; docs/data-check.md).
* ``auto``: one of the above, picked from the columns present: ``prompt``+``chosen``+``rejected`` is
  ``preference``, ``messages`` is ``messages``, ``prompt``+``completion`` is ``prompt_completion``, and
  ``chosen``+``rejected`` without a prompt whose values are Human:/Assistant: transcripts is ``hh``.

Bad records in local files stop the run with a ``ConfigError`` naming the file, the line and the
fix. Hub rows that cannot be converted (HH has a handful without a final assistant turn) are
skipped and counted in one warning: the user cannot edit the hub copy. A pair whose chosen and
rejected answers are identical carries no preference (zero gradient for the RM and DPO losses, a
sure miss in eval accuracy): such pairs are dropped with one counted warning, unless they are more
than ``MAX_IDENTICAL_FRACTION`` of a local file, which points at a mistake (both columns mapped to
the same data) and stops the run.

Local copies of hub data (``data.source=hub`` with ``data.path`` a local file or folder; a path is
local when it starts with ``/``, ``.`` or ``~``, has more than one ``/``, ends in a data-file extension
or exists on disk; anything else is a hub id):

* a file (``.jsonl``, ``.json``, ``.parquet``; ``.jsonl.gz``/``.json.gz`` as HH ships them) is the
  train split that every configured train split (``sft_train_split``, ``pref_train_split``) reads;
  the eval split is held out of it with ``data.eval_fraction`` (seeded), said in one warning line.
* a folder is read as its hub repo's own layout: ``datasets.load_dataset(folder, data_dir=data.data_dir,
  split=...)`` with the configured split names (HH: ``<subset>/train.jsonl.gz``, ``<subset>/test.jsonl.gz``
  -> ``train``/``test``, one subset with ``data.data_dir=harmless-base``; UltraFeedback:
  ``data/train_prefs-*.parquet`` ... -> ``train_prefs``, ``test_prefs``, ``train_sft``, ``test_sft``).
  A missing eval split is held out of train (one warning); a missing train split is a ``ConfigError``
  listing the splits found.
* its rows are converted as hub rows are (unreadable ones skipped and counted, not fatal).

``check_data_files`` refuses a missing local file or folder (and a ``data.data_dir`` the folder lacks)
at config-check time.

Counts (``load_sft``/``load_preferences`` with ``counts={}``) fill, per split, ``{"loaded": n, "kept": n,
"dropped": {reason: n}}`` under ``"train"`` and ``"eval"`` (``None`` when there is no eval split).
``loaded`` is the records the split drew from its source; ``kept`` the records returned; for each split
``loaded == kept + sum(dropped.values())``. An eval split held out of the train data counts the records
it took as its ``loaded`` and the train split's ``loaded`` leaves them out, so the two add up to the
records read. Reasons (only those that occurred are listed):

* ``identical_pair``: chosen and rejected answers identical (no preference);
* ``unreadable``: a hub (or local-copy) row that could not be converted, e.g. an HH row without a final
  assistant turn;
* ``capped``: left out by ``data.max_train_samples``/``data.max_eval_samples``.

``datasets`` is imported lazily: ``check_data_files`` runs on the CLI's light config-check path.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING
from omegaconf.errors import MissingMandatoryValue

from rlhf_exp.config.errors import ConfigError, hub_unreachable
from rlhf_exp.config.schema import DataFormat

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FORMATS = tuple(DataFormat)
SFT_COLUMNS = ("prompt", "completion")
PREF_COLUMNS = ("prompt", "chosen", "rejected")
# auto-detection order: the first layout whose columns are all present wins
AUTO_LAYOUTS = (
    ("preference", ("prompt", "chosen", "rejected")),
    ("messages", ("messages",)),
    ("prompt_completion", ("prompt", "completion")),
)
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# above this share of identical chosen/rejected pairs a local file is refused, not cleaned
MAX_IDENTICAL_FRACTION = 0.1
# local copies of hub data: file extension -> datasets builder; json files may be compressed
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz")
# reasons a record is left out, as counted in ``counts[split]["dropped"]``
DROP_REASONS = ("identical_pair", "unreadable", "capped")
# rows looked at to tell whether chosen/rejected hold HH transcripts (format=auto)
_HH_SAMPLE = 5


class RowError(ValueError):
    """One record cannot be converted; the caller adds where it is (file line) or skips it (hub)."""


class IdenticalPair(RowError):
    """chosen == rejected: dropped and counted (local files), skipped (hub)."""


# ------------------------------------------------------------------------ public API


def check_data_files(data_cfg) -> None:
    """Fail at config-check time, before any model loads, when a local file or folder is absent."""
    if data_cfg.source == "hub":
        _check_local_copy(data_cfg)
        return
    if data_cfg.source != "jsonl":
        return
    if _setting(data_cfg, "train_file") is None:
        raise ConfigError("data=jsonl needs a training file: add data.train_file=/path/train.jsonl")
    for key in ("train_file", "eval_file"):
        value = _setting(data_cfg, key)
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"data.{key}={value}: no such file (looked in {path.resolve()}). Fix the path.")
        if not path.is_file():
            raise ConfigError(f"data.{key}={value}: is a folder, not a file. Point it at a .jsonl file.")


def load_sft(data_cfg, seed: int, counts: dict | None = None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """SFT splits with columns ``prompt`` and ``completion``; ``seed`` drives holdout and caps.
    ``counts``, when given, is filled with the records loaded, kept and dropped per split."""
    return _load(data_cfg, seed, "sft", counts)


def load_preferences(data_cfg, seed: int,
                     counts: dict | None = None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Preference splits with columns ``prompt``, ``chosen`` and ``rejected`` (``counts`` as load_sft)."""
    return _load(data_cfg, seed, "pref", counts)


# --------------------------------------------------------------------------- loading


def _load(data_cfg, seed: int, task: str, counts: dict | None) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if data_cfg.format not in FORMATS:
        raise ConfigError(f"data.format={data_cfg.format}: not a known layout. Valid: {', '.join(FORMATS)}")
    tallies: dict[str, dict | None] = {"train": None, "eval": None}
    if data_cfg.source == "hub":
        out = _load_hub(data_cfg, seed, task, tallies)
    elif data_cfg.source == "jsonl":
        out = _load_jsonl(data_cfg, seed, task, tallies)
    else:
        raise ValueError(f"sources handles data.source hub and jsonl, not {data_cfg.source!r}")
    if counts is not None:
        for split, dataset in zip(("train", "eval"), out):
            tally = tallies[split]
            if tally is not None:
                tally["kept"] = len(dataset)
            counts[split] = tally
    return out


def _tally(loaded: int) -> dict:
    return {"loaded": loaded, "kept": 0, "dropped": {}}


def _drop(tally: dict, reason: str, n: int) -> None:
    if n:
        tally["dropped"][reason] = tally["dropped"].get(reason, 0) + n


def _load_hub(data_cfg, seed: int, task: str, tallies: dict) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Convert with Dataset.map so big sets stay arrow-backed and cached; caps apply before
    conversion (quick trials on big sets), so a capped split can be a few skipped rows short."""
    if not data_cfg.path:
        raise ConfigError("data.source=hub needs data.path (the data set's hub id, e.g. Anthropic/hh-rlhf, "
                          "or a local copy)")
    train_key, eval_key = ("sft_train_split", "sft_eval_split") if task == "sft" else (
        "pref_train_split", "pref_eval_split")
    train_name, eval_name = getattr(data_cfg, train_key), getattr(data_cfg, eval_key)
    local = local_path(data_cfg.path)
    if local is None:
        train_raw = _hub_split(data_cfg, train_key)
        eval_raw = _hub_split(data_cfg, eval_key) if eval_name is not None else None
        why, holdout_what = None, f"data.{train_key}"
    else:
        _check_local_copy(data_cfg)
        train_raw, eval_raw, why = _local_splits(local, data_cfg, train_key, eval_key)
        holdout_what = f"data.path={data_cfg.path}" if local.is_file() else f"data.{train_key}"
        if local.is_file():
            train_name = None  # a file has no split name of its own
    if eval_raw is None:
        n_read = len(train_raw)
        eval_fix = None if local is not None and local.is_file() else f"data.{eval_key}=<split>"
        train_raw, eval_raw = _holdout(train_raw, data_cfg.eval_fraction, seed, holdout_what, eval_fix)
        eval_name = "held-out"
        if why and eval_raw is not None:
            log.warning("data.path=%s %s: holding out %d of its %d rows for eval (data.eval_fraction=%s, seed %d).",
                        data_cfg.path, why, len(eval_raw), n_read, data_cfg.eval_fraction, seed)
    tallies["train"] = _tally(len(train_raw))
    capped = _cap(train_raw, data_cfg.max_train_samples, seed, "max_train_samples")
    _drop(tallies["train"], "capped", len(train_raw) - len(capped))
    train = _convert_hub(capped, data_cfg, task, train_name, tallies["train"])
    eval_ = None
    if eval_raw is not None:
        tallies["eval"] = _tally(len(eval_raw))
        capped = _cap(eval_raw, data_cfg.max_eval_samples, seed, "max_eval_samples")
        _drop(tallies["eval"], "capped", len(eval_raw) - len(capped))
        eval_ = _convert_hub(capped, data_cfg, task, eval_name, tallies["eval"])
    return train, eval_


def _hub_split(data_cfg, key: str) -> datasets.Dataset:
    import datasets

    split = getattr(data_cfg, key)
    try:
        return datasets.load_dataset(data_cfg.path, name=data_cfg.subset, data_dir=data_cfg.data_dir,
                                     revision=data_cfg.revision, split=split)
    except OSError as exc:  # no network, no such data set (ConnectionError, FileNotFoundError)
        raise hub_unreachable("data.path", data_cfg.path, exc) from exc
    except ValueError as exc:
        if "split" not in str(exc).lower():
            raise
        raise ConfigError(f"data.{key}={split}: {str(exc).splitlines()[0]}\n"
                          f"Set data.{key} to a split of {data_cfg.path}"
                          + (" (null = hold out data.eval_fraction of train)." if "eval" in key else ".")) from exc


# ------------------------------------------------------------- local copies of hub data


def local_path(value: Any) -> Path | None:
    """The local file or folder ``data.path`` names, or None for a hub id (``org/name``)."""
    if not value:
        return None
    text = str(value)
    path = Path(text).expanduser()
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or path.exists() or _file_builder(path):
        return path
    return None


def _file_builder(path: Path) -> str | None:
    """The datasets builder reading a local data file (json, parquet), from its extension."""
    name = path.name.lower()
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = name.rsplit(".", 1)[0]
    builder = LOCAL_BUILDERS.get(Path(name).suffix)
    return None if compressed and builder == "parquet" else builder


def _check_local_copy(data_cfg) -> None:
    value = _setting(data_cfg, "path")
    local = local_path(value)
    if local is None:
        return
    if not local.exists():
        raise ConfigError(f"data.path={value}: no such file or folder (looked in {local.resolve()}). "
                          f"Fix the path to your local copy, or give a hub id (org/name).")
    data_dir = _setting(data_cfg, "data_dir")
    if local.is_file():
        if _file_builder(local) is None:
            raise ConfigError(f"data.path={value}: cannot read this kind of file. Give a .jsonl, .json or .parquet "
                              f"file (.jsonl.gz and .json.gz too), or a folder holding them.")
        if data_dir:
            raise ConfigError(f"data.data_dir={data_dir}: picks a subfolder of a folder data.path, but "
                              f"data.path={value} is a file. Set data.data_dir=null, or point data.path at the folder.")
    elif data_dir and not (local / data_dir).is_dir():
        found = sorted(p.name for p in local.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise ConfigError(f"data.data_dir={data_dir}: no such folder in data.path={value} (folders: "
                          f"{', '.join(found) or 'none'}). Fix data.data_dir, or set data.data_dir=null to read them all.")


def _local_splits(local: Path, data_cfg, train_key: str, eval_key: str):
    """(train, eval or None, why eval is held out or None) from a local file or folder."""
    import datasets

    where = f"data.path={data_cfg.path}"
    if local.is_file():
        raw = _read_local(where, lambda: datasets.load_dataset(_file_builder(local), data_files=str(local),
                                                                split="train"))
        return raw, None, "is a single file, read as the train split"
    data_dir = _setting(data_cfg, "data_dir")
    kwargs = {"data_dir": data_dir}
    if _setting(data_cfg, "subset"):
        kwargs["name"] = data_cfg.subset
    try:
        builder = datasets.load_dataset_builder(str(local), **kwargs)
    except FileNotFoundError as exc:  # EmptyDatasetError: no data files in the folder
        raise ConfigError(f"{where}" + (f" data.data_dir={data_dir}" if data_dir else "") + ": no data files "
                          "found (.jsonl, .json, .parquet, ...). Point data.path at the folder holding them.") from exc
    except ValueError as exc:  # e.g. README.md configs naming splits whose files are not there
        raise ConfigError(f"{where}: cannot tell its splits ({str(exc).splitlines()[0][:300]}).\nIts README.md may name "
                          f"splits whose files are missing: add them, or remove README.md to take the split names "
                          f"from the file names.") from exc
    found = [str(split) for split in (builder.config.data_files or {})]
    train_split, eval_split = getattr(data_cfg, train_key), getattr(data_cfg, eval_key)
    if train_split not in found:
        in_dir = f" (data.data_dir={data_dir})" if data_dir else ""
        example = next((name for name in found if "train" in name), found[0] if found else "train")
        raise ConfigError(f"data.{train_key}={train_split}: {where}{in_dir} has no such split "
                          f"(splits found: {', '.join(found) or 'none'}). Set data.{train_key} to one of them, "
                          f"e.g. data.{train_key}={example}.")

    def split_of(name: str) -> datasets.Dataset:
        return _read_local(where, lambda: datasets.load_dataset(str(local), split=name, **kwargs))

    if eval_split is not None and eval_split in found:
        return split_of(train_split), split_of(eval_split), None
    why = None
    if eval_split is not None:
        why = (f"has no {eval_split!r} split (data.{eval_key}; splits found: {', '.join(found)}), "
               f"so it comes out of {train_split!r}")
    return split_of(train_split), None, why


def _read_local(where: str, read):
    from datasets.exceptions import DatasetGenerationError

    try:
        return read()
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        raise ConfigError(f"{where}: cannot read it ({type(cause).__name__}: {first}). "
                          f"Check that it holds JSON Lines, JSON or Parquet data.") from exc


# ----------------------------------------------------------------------- conversion


def _convert_hub(raw: datasets.Dataset, data_cfg, task: str, split: str | None, tally: dict) -> datasets.Dataset:
    where = f"data.path={data_cfg.path}" + (f" split={split}" if split else "")
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = _detect(raw.column_names, data_cfg.columns, where, raw.select(range(min(_HH_SAMPLE, len(raw)))))
    fields = _field_columns(fmt, task, data_cfg.columns, raw.column_names, where)
    missing = [col for col in fields.values() if col not in raw.column_names]
    if missing:
        raise ConfigError(f"{where}: no column {', '.join(map(repr, missing))} (columns: "
                          f"{', '.join(raw.column_names)}).\nSet data.columns.<field> to the right column, "
                          f"or data.format to the layout of this data set.")
    out = raw.map(_convert_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                  fn_kwargs={"fields": fields, "fmt": fmt, "task": task}, desc=f"Converting {split or 'file'}")
    if len(out) == 0:
        raise ConfigError(f"{where}: none of its {len(raw)} rows could be read as data.format={fmt}. "
                          f"Check data.format and data.columns.")
    skipped = len(raw) - len(out)
    if skipped:
        # the few skipped rows are converted again to tell why (the map itself stays cacheable)
        kept = set(out["_row"])
        reasons = {"unreadable": 0, "identical_pair": 0}
        for row in raw.select([i for i in range(len(raw)) if i not in kept]):
            try:
                _convert({field: row[col] for field, col in fields.items()}, fmt, task)
            except IdenticalPair:
                reasons["identical_pair"] += 1
            except RowError:
                reasons["unreadable"] += 1
        for reason, n in reasons.items():
            _drop(tally, reason, n)
        detail = ", ".join(text for n, text in (
            (reasons["unreadable"], f"{reasons['unreadable']} unreadable as data.format={fmt} "
                                    f"(e.g. no final assistant turn)"),
            (reasons["identical_pair"], f"{reasons['identical_pair']} with chosen identical to rejected")) if n)
        log.warning("%s: skipped %d of %d rows: %s", where, skipped, len(raw), detail)
    # map keeps reused names (chosen, rejected) in their source position; fix the order
    return out.select_columns(list(SFT_COLUMNS if task == "sft" else PREF_COLUMNS))


def _convert_batch(batch: dict[str, list], indices: list[int], fields: dict[str, str], fmt: str,
                   task: str) -> dict[str, list]:
    """Batched map: unreadable rows are dropped from the output; ``_row`` names the rows kept."""
    names = SFT_COLUMNS if task == "sft" else PREF_COLUMNS
    out: dict[str, list] = {name: [] for name in (*names, "_row")}
    for i, index in enumerate(indices):
        try:
            record = _convert({field: batch[col][i] for field, col in fields.items()}, fmt, task)
        except RowError:
            continue
        for name in names:
            out[name].append(record[name])
        out["_row"].append(index)
    return out


def _load_jsonl(data_cfg, seed: int, task: str, tallies: dict) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    import datasets

    check_data_files(data_cfg)
    train_records, kind, identical = _read_records(data_cfg, "train_file", task, None)
    train = datasets.Dataset.from_list(train_records)
    tallies["train"] = _tally(len(train_records) + identical)
    _drop(tallies["train"], "identical_pair", identical)
    if _setting(data_cfg, "eval_file") is not None:
        eval_records, _, identical = _read_records(data_cfg, "eval_file", task, kind)
        eval_ = datasets.Dataset.from_list(eval_records)
        tallies["eval"] = _tally(len(eval_records) + identical)
        _drop(tallies["eval"], "identical_pair", identical)
    else:
        train, eval_ = _holdout(train, data_cfg.eval_fraction, seed, f"data.train_file={data_cfg.train_file}",
                                "data.eval_file=<file> (may be the train file itself)")
        if eval_ is not None:  # the held-out records count as the eval split's, not the train split's
            tallies["train"]["loaded"] -= len(eval_)
            tallies["eval"] = _tally(len(eval_))
    capped = _cap(train, data_cfg.max_train_samples, seed, "max_train_samples")
    _drop(tallies["train"], "capped", len(train) - len(capped))
    train = capped
    if eval_ is not None:
        capped = _cap(eval_, data_cfg.max_eval_samples, seed, "max_eval_samples")
        _drop(tallies["eval"], "capped", len(eval_) - len(capped))
        eval_ = capped
    return train, eval_


def _read_records(data_cfg, key: str, task: str, kind: str | None) -> tuple[list[dict], str, int]:
    """Validate and convert every record of one file; ``kind`` (standard/conversational) must match
    across records and files, since a trainer applies the chat template to all rows or none.
    Returns the records, their kind and how many identical pairs were dropped."""
    path = _setting(data_cfg, key)
    where = f"data.{key}={path}"
    fmt, fields, records, identical = data_cfg.format, None, [], []
    kind_line = 0
    for line_no, obj in _jsonl_objects(Path(path).expanduser(), where):
        if fields is None:
            if fmt == "auto":
                fmt = _detect(list(obj), data_cfg.columns, f"{where} line {line_no}", [obj])
            fields = _field_columns(fmt, task, data_cfg.columns, list(obj), where)
        missing = [col for col in fields.values() if col not in obj]
        if missing:
            raise ConfigError(f"{where} line {line_no}: missing {', '.join(map(repr, missing))}; "
                              f"data.format={fmt} needs {', '.join(map(repr, fields.values()))} on every line "
                              f"(rename with data.columns.<field>=<your column>).")
        try:
            record = _convert({field: obj[col] for field, col in fields.items()}, fmt, task)
        except IdenticalPair:
            identical.append(line_no)
            continue
        except RowError as exc:
            raise ConfigError(f"{where} line {line_no}: {exc}") from None
        record_kind = "conversational" if isinstance(record["prompt"], list) else "standard"
        if kind is None:
            kind, kind_line = record_kind, line_no
        elif record_kind != kind:
            first = f"line {kind_line}" if kind_line else "data.train_file"
            raise ConfigError(f"{where} line {line_no}: a {record_kind} record after {kind} ones ({first}). "
                              f"Use strings everywhere or chat lists everywhere.")
        records.append(record)
    if identical:
        total = len(records) + len(identical)
        lines = ", ".join(map(str, identical[:5])) + (", ..." if len(identical) > 5 else "")
        if len(identical) > MAX_IDENTICAL_FRACTION * total:
            raise ConfigError(f"{where} line {identical[0]}: chosen and rejected are identical in {len(identical)} of {total} "
                              f"records (lines {lines}), over {MAX_IDENTICAL_FRACTION:.0%}: are data.columns.chosen/"
                              f"rejected the same column? Fix the columns, or remove those records.")
        log.warning("%s: dropped %d of %d records whose chosen and rejected are identical (lines %s): "
                    "they carry no preference", where, len(identical), total, lines)
    if not records:
        raise ConfigError(f"{where}: empty file (no records). Add one JSON object per line.")
    return records, kind, len(identical)


def _jsonl_objects(path: Path, where: str):
    """Yield (line number, object) for each non-blank line, with precise errors."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{where} line {line_no}: not valid UTF-8 (byte {raw[exc.start]:#04x} at "
                                  f"column {exc.start + 1}). Save the file as UTF-8.") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip("\r\n"))  # so the column points into the line
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where} line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}). "
                                  f"Each line must hold one JSON object.") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{where} line {line_no}: expected a JSON object ({{...}}), "
                                  f"got {type(obj).__name__ if not isinstance(obj, list) else 'an array'}.")
            yield line_no, obj


# ------------------------------------------------------------------ splits and caps


def _holdout(ds: datasets.Dataset, fraction: float, seed: int, what: str, eval_fix: str | None = None):
    """Seeded random holdout; ``fraction`` <= 0 means no eval set. ``eval_fix`` names the setting that
    gives an eval set instead (None: there is none, e.g. a local copy given as one file)."""
    if fraction <= 0:
        return ds, None
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        given = f", or give an eval set: {eval_fix}" if eval_fix else ""
        if len(ds) < 2:  # no fraction helps: a held-out split takes at least 1 record and leaves at least 1
            records = f"{len(ds)} record{'' if len(ds) == 1 else 's'}"
            raise ConfigError(f"{what}: {records} cannot be split into train and eval; holding out an eval set "
                              f"(data.eval_fraction) needs at least 2 records. Add records{given}.")
        raise ConfigError(f"{what}: holding out data.eval_fraction={fraction} of {len(ds)} records leaves none to "
                          f"train on. Lower it (data.eval_fraction=0.5 or less keeps at least 1){given}.")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _cap(ds: datasets.Dataset, cap: int | None, seed: int, key: str) -> datasets.Dataset:
    if cap is None:
        return ds
    if cap <= 0:
        raise ConfigError(f"data.{key}={cap}: must be a positive number of examples, or null for all.")
    return ds.shuffle(seed=seed).select(range(cap)) if cap < len(ds) else ds


# ---------------------------------------------------------------- columns and layout


def _detect(columns: list[str], colmap, where: str, rows=()) -> str:
    """The layout from the columns present; ``rows`` (a few source records) tell HH transcripts apart."""
    names = {field: getattr(colmap, field) for field in ("prompt", "completion", "chosen", "rejected", "messages")}
    for fmt, needed in AUTO_LAYOUTS:
        if all(names[f] is not None and names[f] in columns for f in needed):
            return fmt
    pair = [names["chosen"], names["rejected"]]
    if all(col is not None and col in columns for col in pair) and not (names["prompt"] and names["prompt"] in columns):
        values = [row[col] for row in rows for col in pair]
        if values and all(_looks_hh(v) for v in values):
            return "hh"
    accepted = [f"{'+'.join(names[f] or f'<{f}>' for f in needed)} ({fmt})" for fmt, needed in AUTO_LAYOUTS]
    accepted.append(f"{'+'.join(n or f'<{f}>' for n, f in zip(pair, ('chosen', 'rejected')))} transcripts (hh)")
    raise ConfigError(f"{where}: cannot tell the layout from columns {', '.join(map(repr, columns)) or '(none)'}. "
                      f"Accepted: {'; '.join(accepted)}.\nRename them with data.columns.<field>=<column>, or set "
                      f"data.format (data.format=hh for \"Human: ... Assistant: ...\" transcripts).")


def _looks_hh(value: Any) -> bool:
    """An HH transcript: ``"\\n\\nHuman: ..."`` (the odd row ends without an assistant turn)."""
    return isinstance(value, str) and (value.startswith(("\n\nHuman:", "Human:")) or "\n\nAssistant:" in value)


def _field_columns(fmt: str, task: str, colmap, available: list[str], where: str) -> dict[str, str]:
    """The source column of each field the conversion reads (optional prompt left out when null)."""
    if task == "pref" and fmt in ("messages", "prompt_completion"):
        raise ConfigError(f"{where}: data.format={fmt} has no rejected answers; reward modelling, DPO and PPO "
                          f"need preference pairs: data.format=preference (prompt, chosen, rejected) or hh.")
    if fmt == "hh":
        needed, optional = (["chosen"] if task == "sft" else ["chosen", "rejected"]), []
    elif fmt == "preference" and task == "sft" and colmap.messages and colmap.messages in available:
        needed, optional = ["messages"], []
    elif fmt == "preference":
        needed, optional = (["chosen"] if task == "sft" else ["chosen", "rejected"]), ["prompt"]
    elif fmt == "messages":
        needed, optional = ["messages"], []
    else:
        needed, optional = ["prompt", "completion"], []
    unset = [f for f in needed if getattr(colmap, f) is None]
    if unset:
        raise ConfigError(f"data.format={fmt} reads {', '.join(unset)}, but data.columns.{unset[0]} is null. "
                          f"Set data.columns.{unset[0]}=<column>.")
    fields = {f: getattr(colmap, f) for f in optional if getattr(colmap, f) is not None}
    fields.update({f: getattr(colmap, f) for f in needed})
    return fields


# ----------------------------------------------------------------- record conversion


def _convert(values: dict[str, Any], fmt: str, task: str) -> dict[str, Any]:
    """One source record (fields already renamed) -> an SFT or preference record; RowError if bad."""
    if "messages" in values:
        return _from_messages(_messages(values["messages"], "messages"))
    if fmt == "hh":
        if task == "sft":
            return _from_messages(_parse_hh(values["chosen"], "chosen"))
        values = {"chosen": _parse_hh(values["chosen"], "chosen"),
                  "rejected": _parse_hh(values["rejected"], "rejected")}
    answer_fields = ["completion"] if fmt == "prompt_completion" else (
        ["chosen"] if task == "sft" else ["chosen", "rejected"])
    prompt, answers = _pair(values.get("prompt"), {f: values[f] for f in answer_fields})
    if task == "sft":
        return {"prompt": prompt, "completion": answers[answer_fields[0]]}
    if answers["chosen"] == answers["rejected"]:
        raise IdenticalPair("chosen and rejected are identical, so the pair carries no preference.")
    return {"prompt": prompt, **answers}


def _from_messages(messages: list[dict]) -> dict[str, Any]:
    if len(messages) < 2:
        raise RowError("messages: need at least one prompt message before the final assistant turn.")
    _check_answer(messages, "messages")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def _pair(prompt: Any, answers: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Prompt + answers in one representation: all strings, or chat lists whose shared leading
    messages (UltraFeedback repeats the user turn in each answer) become the prompt."""
    if all(isinstance(v, str) for v in answers.values()) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:
            raise RowError("no prompt: text answers need a prompt column (set data.columns.prompt).")
        for name, value in {"prompt": prompt, **answers}.items():
            if not value.strip():
                raise RowError(f"{name} is an empty string. Fill it in or remove the record.")
        return prompt, answers
    chats = {}
    for name, value in answers.items():
        chats[name] = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, name)
        _check_answer(chats[name], name)
    # an answer given as its final turn alone (e.g. a string) carries no context of its own
    contexts = [chat[:-1] for chat in chats.values() if len(chat) > 1]
    if any(ctx != contexts[0] for ctx in contexts[1:]):
        raise RowError(f"{' and '.join(chats)} differ before their final assistant turn; "
                       f"they must share the prompt.")
    context = contexts[0] if contexts else []
    if prompt is None:
        full = context
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("prompt is an empty string. Fill it in or remove the record.")
        full = context or [{"role": "user", "content": prompt}]
    else:
        given = _messages(prompt, "prompt")
        full = context if context[: len(given)] == given else given + context
    if not full:
        raise RowError("no prompt: the answers hold no messages before the final assistant turn "
                       "(set data.columns.prompt).")
    return full, {name: [chat[-1]] for name, chat in chats.items()}


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        raise RowError(f"{name}: expected a list of messages, got a string.")
    if not isinstance(value, list) or not value:
        # every field but a chat transcript ("messages") also takes a plain string
        either = "a non-empty string or " if name != "messages" else ""
        raise RowError(f"{name}: expected {either}a non-empty list of {{\"role\": str, \"content\": str}} messages, "
                       f"got {_shown_value(value)}.")
    out = []
    for i, msg in enumerate(value, 1):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise RowError(f"{name}: message {i} is not a {{\"role\": str, \"content\": str}} object "
                           f"(got {msg!r:.60}).")
        if not msg["content"].strip() and msg["role"] != "system":  # an empty system prompt is common and harmless
            raise RowError(f"{name}: message {i} ({msg['role']}) is an empty string. Fill it in or remove the record.")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _shown_value(value: Any) -> str:
    """A bad field value in a message: its JSON text (cut short) and its JSON type."""
    if isinstance(value, list):  # only an empty one gets here
        return "an empty array"
    kind = {bool: "boolean", int: "number", float: "number", dict: "object", type(None): "null"}.get(type(value))
    text = json.dumps(value) if kind else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a JSON {kind})" if kind else f"{text} (a {type(value).__name__})"


def _check_answer(chat: list[dict[str, str]], name: str) -> None:
    last = chat[-1]
    if last["role"] != "assistant":
        raise RowError(f"{name}: the final message is a {last['role']!r} turn; it must be the assistant's answer.")
    if not last["content"].strip():
        raise RowError(f"{name}: the final assistant message is an empty string. Fill it in or remove the record.")


def _parse_hh(text: Any, name: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> user/assistant messages (content stripped)."""
    if not isinstance(text, str):
        raise RowError(f"{name}: expected a Human:/Assistant: transcript string, got {type(text).__name__}.")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(f"{name}: text before the first 'Human:' turn; not an HH transcript.")
    messages = [{"role": _HH_ROLES[role], "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"{name}: no final 'Assistant:' turn in the transcript.")
    if len(messages) < 2:
        raise RowError(f"{name}: no 'Human:' turn before the final 'Assistant:' turn.")
    _check_answer(messages, name)
    return messages


def _setting(data_cfg, key: str) -> str | None:
    """A file setting, with OmegaConf's '???' (unset mandatory) read as None."""
    try:
        value = getattr(data_cfg, key)
    except MissingMandatoryValue:
        return None
    return None if value in (None, MISSING) else value
