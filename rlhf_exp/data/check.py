"""Preference-data quality: ``python -m rlhf_exp.data check [overrides...]`` (docs/data-check.md).

Reads the preference pairs a config names (``data=...`` overrides, composed as the main CLI does) straight
from their source, every row, before the loader converts, drops or holds out anything, and reports per split
(``train``: data.train_file / data.pref_train_split / the embedded task's training pairs; ``eval``: the eval
file or split, when there is one):

errors (exit status 1): rows that cannot be read (``schema``: not JSON, not an object, missing or wrong-typed
columns), ``empty`` prompt/chosen/rejected, ``identical`` chosen == rejected (no preference);
warnings (exit 0, 1 with ``--strict``): ``duplicate_pairs`` (same prompt, chosen and rejected as an earlier
row), ``contradicting_pairs`` (an earlier row prefers the other answer), ``over_max_length`` (longer than
``phase.max_length`` tokens, dropped or cut by the phase's trainer), annotator agreement below
``agreement.POOR_BELOW``, and ``unlabelled`` rows in a multi-annotator set. Counted, not warned:
``duplicate_prompts`` (many sets pair several answer pairs per prompt), and length distributions
(min/median/p95/max tokens of prompt, chosen and rejected).

Each finding names the first offending rows (``line N`` of a file, ``row N`` of a hub split, ``pair N`` of
the embedded task). Token lengths use the model's tokenizer (``model=...``), as the trainers count them: the
prompt with the tokenizer's special tokens (chat prompts rendered by the chat template with the generation
prompt), each answer with its end-of-sequence token; the embedded model's 15-token tokenizer only reads the
embedded task, so other data are measured in characters (``--no-tokenizer`` forces that, and no truncation is
counted).

Multi-annotator layout: a row may carry ``labels``, a list of each annotator's pick for that pair, ``"chosen"``,
``"rejected"``, ``"tie"`` or ``null`` (not labelled by that annotator); annotator i is position i in every
row. Agreement is measured on the two answers in a fixed order that does not depend on which one the data
set calls chosen (ordered by a hash of their text), so that the data set's own label (usually the majority's
or one annotator's) does not bias chance agreement.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.data import agreement as agree

FIRST_ROWS = 5  # offending rows named per finding
ERRORS = ("schema", "empty", "identical")
WARNINGS = ("duplicate_pairs", "contradicting_pairs", "over_max_length", "unlabelled", "low_agreement")
LABELS = ("chosen", "rejected", "tie")
PHASES = ("rm", "dpo")
RULES = {"rm": "RM drops pairs whose prompt + longer answer exceed phase.max_length={n} tokens",
         "dpo": "DPO drops pairs whose prompt fills phase.max_length={n} and cuts prompt + answer to it"}
FINDINGS_TEXT = {
    "schema": "rows that cannot be read",
    "empty": "rows with an empty prompt, chosen or rejected",
    "identical": "pairs whose chosen and rejected are identical (no preference)",
    "duplicate_pairs": "pairs repeating an earlier row (same prompt, chosen and rejected)",
    "contradicting_pairs": "pairs preferring the other answer of an earlier row",
    "over_max_length": "pairs longer than phase.max_length",
    "unlabelled": "rows without annotator labels in a multi-annotator set",
    "low_agreement": "annotator agreement",
}


@dataclass
class Finding:
    count: int = 0
    rows: list[str] = field(default_factory=list)  # the first FIRST_ROWS, "line 3: why"

    def add(self, ref: str, why: str) -> None:
        self.count += 1
        if len(self.rows) < FIRST_ROWS:
            self.rows.append(f"{ref}: {why}")


@dataclass
class RawRow:
    ref: str  # "line 3", "row 3", "pair 3"
    obj: Any = None  # the source record (a dict), or None when unreadable
    error: str | None = None


@dataclass
class Section:
    split: str  # train / eval
    where: str  # what was read, e.g. "data.train_file=x.jsonl"
    rows: Iterator[RawRow]
    fmt: str = "auto"
    ready: bool = False  # rows already in prompt/chosen/rejected(/labels) form (the embedded task)
    # what the rows are, as a string that changes when they do (a file's path, size, inode and times; a datasets
    # split's fingerprint; the embedded task's pairs' digest); None: no report of these rows is ever kept
    identity: str | None = None


# ------------------------------------------------------------------------------------------- reading


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[RawRow]:
    """Every non-blank line of a JSON Lines file (gzip too), unreadable ones included, by line number."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        seen = 0
        for line_no, raw in enumerate(f, 1):
            ref = f"line {line_no}"
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(ref, error=f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
                continue
            if not text.strip():
                continue
            seen += 1
            if limit is not None and seen > limit:
                return
            try:
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield RawRow(ref, error=f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield RawRow(ref, error=f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield RawRow(ref, obj)


def _pairs_digest(pairs) -> str:
    """The embedded task's pairs (built in memory) by their content: what the checks read of them."""
    rows = [[p.prompt, p.chosen, p.rejected, list(p.labels) if p.labels else None] for p in pairs]
    return "pairs " + hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _identity(path: Path) -> str:
    """A file's path, size, inode and times: any write changes its status-change time, which no copy can set."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _dataset_rows(ds, limit: int | None) -> Iterator[RawRow]:
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        yield RawRow(f"row {i + 1}", ds[i])


def _synthetic_rows(pairs, limit: int | None) -> Iterator[RawRow]:
    for i, p in enumerate(pairs if limit is None else pairs[:limit], 1):
        row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        if p.labels:
            row["labels"] = list(p.labels)
        yield RawRow(f"pair {i}", row)


def sections(data, limit: int | None = None) -> list[Section]:
    """The splits of preference pairs ``data`` (a DataConfig) names, read as they are in their source."""
    from rlhf_exp.data.sources import _file_builder, _setting, check_data_files, local_path

    fmt = str(data.format)
    if data.source == "synthetic":
        from rlhf_exp.data.loading import synthetic_splits

        splits = synthetic_splits(data)
        return [Section("train", "the embedded task's training pairs", _synthetic_rows(splits["pref_train"], limit),
                        ready=True, identity=_pairs_digest(splits["pref_train"])),
                Section("eval", "the embedded task's eval pairs", _synthetic_rows(splits["pref_eval"], limit),
                        ready=True, identity=_pairs_digest(splits["pref_eval"]))]
    check_data_files(data)
    if data.source == "jsonl":
        out = []
        for split, key in (("train", "train_file"), ("eval", "eval_file")):
            value = _setting(data, key)
            if value is not None:
                path = Path(value).expanduser()
                out.append(Section(split, f"data.{key}={value}", _jsonl_rows(path, limit), fmt, identity=_identity(path)))
        return out
    # hub: a local JSON Lines file line by line; anything else through datasets, by row
    local = local_path(data.path)
    where = f"data.path={data.path}"
    if local is not None and local.is_file():
        if _file_builder(local) == "json" and ".jsonl" in local.name:
            return [Section("train", where, _jsonl_rows(local, limit), fmt, identity=_identity(local))]
        import datasets

        ds = datasets.load_dataset(_file_builder(local), data_files=str(local), split="train")
        return [Section("train", where, _dataset_rows(ds, limit), fmt, identity=getattr(ds, "_fingerprint", None))]
    import datasets

    out = []
    for split, key in (("train", "pref_train_split"), ("eval", "pref_eval_split")):
        name = getattr(data, key)
        if name is None:
            continue
        kwargs = {"data_dir": data.data_dir, "split": name}
        if data.subset:
            kwargs["name"] = data.subset
        if local is None and data.revision:
            kwargs["revision"] = data.revision
        try:
            ds = datasets.load_dataset(str(local) if local is not None else data.path, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            if split == "eval":  # no such eval split: the loader holds eval out of train
                continue
            raise ConfigError(f"{where} data.{key}={name}: {str(exc).splitlines()[0][:300]}") from exc
        except OSError as exc:
            from rlhf_exp.config.errors import hub_unreachable

            raise hub_unreachable("data.path", data.path, exc) from exc
        out.append(Section(split, f"{where} split={name}", _dataset_rows(ds, limit), fmt,
                           identity=getattr(ds, "_fingerprint", None)))
    return out


# ------------------------------------------------------------------------------------------- lengths


class Lengths:
    """Token lengths as the trainers count them (module docstring); characters when ``tokenizer`` is None."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.unit = "tokens" if tokenizer is not None else "characters"

    def __call__(self, prompt, chosen, rejected) -> tuple[int, int, int]:
        tok = self.tokenizer
        if tok is None:
            def chars(x):
                return len(x) if isinstance(x, str) else sum(len(m["content"]) for m in x)
            return chars(prompt), chars(chosen), chars(rejected)
        if isinstance(prompt, list):  # the chat template's ids, as the trainers tokenize them (data.encode)
            from rlhf_exp.data.encode import prompt_ids, scored_ids

            p = len(prompt_ids(tok, prompt))
            return (p, *(len(scored_ids(tok, prompt, answer)) - p for answer in (chosen, rejected)))
        eos = 1 if tok.eos_token_id is not None else 0
        return (len(tok(prompt)["input_ids"]), *(len(tok(answer, add_special_tokens=False)["input_ids"]) + eos
                                                 for answer in (chosen, rejected)))


def distribution(values: list[int]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]  # nearest rank
    median = statistics.median(ordered)
    return {"min": ordered[0], "median": int(median) if median == int(median) else median, "p95": p95,
            "max": ordered[-1]}


# -------------------------------------------------------------------------------------------- checks


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value
    return False


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _frame(chosen, rejected) -> dict[str, str]:
    """Each label in a fixed order of the two answers, independent of which one is called chosen."""
    hc, hr = (hashlib.sha1(_key(x).encode()).hexdigest() for x in (chosen, rejected))
    first = "chosen" if hc <= hr else "rejected"
    return {first: "first", ("rejected" if first == "chosen" else "chosen"): "second", "tie": "tie"}


def _labels(value, ref: str, annotators: int | None) -> tuple[list | None, str | None]:
    """(labels, None) or (None, why not readable)."""
    if not isinstance(value, list) or len(value) < 1:
        return None, f"labels: expected a list of each annotator's pick ({', '.join(map(repr, LABELS))} or null)"
    bad = [x for x in value if x is not None and x not in LABELS]
    if bad:
        return None, f"labels: {bad[0]!r} is not one of {', '.join(map(repr, LABELS))} or null"
    if annotators is not None and len(value) != annotators:
        return None, f"labels: {len(value)} annotators, but earlier rows have {annotators} (annotator i = position i)"
    return value, None


def check_section(section: Section, lengths: Lengths, max_length: int | None, phase: str,
                  columns=None) -> dict:
    """The report of one split (see the module docstring)."""
    from rlhf_exp.data.sources import IdenticalPair, RowError, _convert, _detect, _field_columns

    found = {name: Finding() for name in (*ERRORS, *WARNINGS[:4])}
    fmt, fields = section.fmt, None
    seen_pairs: dict[str, str] = {}
    prompts: Counter = Counter()
    dists: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    labels_all: list[list] = []
    annotators: int | None = None
    rows = 0
    for raw in section.rows:
        rows += 1
        if raw.error:
            found["schema"].add(raw.ref, raw.error)
            continue
        obj = raw.obj
        if section.ready:
            record = obj
        else:
            if fields is None:
                try:
                    if fmt == "auto":
                        fmt = _detect(list(obj), columns, f"{section.where} {raw.ref}", [obj])
                    fields = _field_columns(fmt, "pref", columns, list(obj), section.where)
                except ConfigError as exc:
                    found["schema"].add(raw.ref, str(exc).split(": ", 1)[-1].splitlines()[0])
                    continue
            missing = [col for col in fields.values() if col not in obj]
            if missing:
                found["schema"].add(raw.ref, f"missing {', '.join(map(repr, missing))} (data.format={fmt} needs "
                                             f"{', '.join(map(repr, fields.values()))})")
                continue
            values = {f: obj[col] for f, col in fields.items()}
            empty = [f for f, v in values.items() if _empty(v)]
            if empty:
                found["empty"].add(raw.ref, f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
                continue
            try:
                record = _convert(values, fmt, "pref")
            except IdenticalPair:
                found["identical"].add(raw.ref, "chosen and rejected are identical")
                continue
            except RowError as exc:
                found["empty" if "empty" in str(exc) else "schema"].add(raw.ref, str(exc))
                continue
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        if section.ready:
            empty = [f for f in ("prompt", "chosen", "rejected") if _empty(record[f])]
            if empty:
                found["empty"].add(raw.ref, f"{' and '.join(empty)} empty")
                continue
            if chosen == rejected:
                found["identical"].add(raw.ref, "chosen and rejected are identical")
                continue
        pk = _key(prompt)
        key, flipped = f"{pk}\x00{_key(chosen)}\x00{_key(rejected)}", f"{pk}\x00{_key(rejected)}\x00{_key(chosen)}"
        if key in seen_pairs:
            found["duplicate_pairs"].add(raw.ref, f"same pair as {seen_pairs[key]}")
        elif flipped in seen_pairs:
            found["contradicting_pairs"].add(raw.ref, f"prefers the other answer of {seen_pairs[flipped]}")
        else:
            seen_pairs[key] = raw.ref
        prompts[pk] += 1
        # annotators' labels
        if "labels" in obj and obj["labels"] is not None:
            labels, why = _labels(obj["labels"], raw.ref, annotators)
            if why:
                found["schema"].add(raw.ref, why)
            else:
                annotators = len(labels)
                frame = _frame(chosen, rejected)
                labels_all.append([None if x is None else frame[x] for x in labels])
        else:
            found["unlabelled"].add(raw.ref, "no labels")
        # lengths
        p, c, r = lengths(prompt, chosen, rejected)
        dists["prompt"].append(p)
        dists["chosen"].append(c)
        dists["rejected"].append(r)
        if max_length is not None and lengths.tokenizer is not None and p + max(c, r) > max_length:
            what = "prompt alone fills it: dropped" if phase == "dpo" and p >= max_length else (
                "cut" if phase == "dpo" else "dropped")
            found["over_max_length"].add(raw.ref, f"{p} + {max(c, r)} {lengths.unit} > {max_length} ({what})")
    if not labels_all:  # no labelled rows at all: not a multi-annotator set
        found["unlabelled"] = Finding()
    report: dict[str, Any] = {"split": section.split, "source": section.where, "rows": rows}
    report["errors"] = {name: vars(found[name]) for name in ERRORS}
    report["warnings"] = {name: vars(found[name]) for name in WARNINGS[:4]}
    dup_prompts = sum(n - 1 for n in prompts.values() if n > 1)
    report["duplicate_prompts"] = {"count": dup_prompts, "distinct_prompts": len(prompts)}
    report["lengths"] = {"unit": lengths.unit, **{k: distribution(v) for k, v in dists.items()}}
    report["max_length"] = {"phase": phase, "max_length": max_length,
                            "rule": RULES[phase].format(n=max_length) if max_length is not None else None}
    if labels_all:
        stats = agree.agreement(labels_all)
        report["agreement"] = stats
        if stats["kappa"] is not None and stats["kappa"] < agree.POOR_BELOW:
            report["warnings"]["low_agreement"] = {"count": 1, "rows": [
                f"{stats['kappa_kind']} kappa {stats['kappa']:.3f} < {agree.POOR_BELOW}: the RM trains on noise"]}
    report["failed"] = any(report["errors"][k]["count"] for k in ERRORS)
    report["warned"] = any(v["count"] for v in report["warnings"].values())
    return report


# ------------------------------------------------------------------------------------------- running


def load_tokenizer_for(cfg, sft_checkpoint: str | None = None):
    """The model's tokenizer, or None (characters) when the embedded model's tokenizer cannot read the data."""
    if cfg.model.source == "embedded" and not (cfg.data.source == "synthetic" and str(cfg.data.synthetic.form) == "plain"):
        return None
    from rlhf_exp.models import load_tokenizer

    return load_tokenizer(cfg.model, checkpoint=sft_checkpoint)


def run_checks(cfg, tokenizer=None, limit: int | None = None, read: list[Section] | None = None) -> dict:
    """The whole report of ``cfg``'s preference data: {"phase", "max_length", "splits": [...], "failed", "warned"}.
    ``read``: the splits' ``sections`` when already opened."""
    phase = str(cfg.phase.name) if str(cfg.phase.name) in PHASES else "rm"
    lengths = Lengths(tokenizer)
    max_length = int(cfg.phase.max_length) if tokenizer is not None else None
    read = sections(cfg.data, limit) if read is None else read
    splits = [check_section(s, lengths, max_length, phase, cfg.data.columns) for s in read]
    return {"data": str(cfg.data.name), "phase": phase, "max_length": max_length, "length_unit": lengths.unit,
            "splits": splits, "failed": any(s["failed"] for s in splits), "warned": any(s["warned"] for s in splits)}


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def render(report: dict) -> str:
    """The report as text: one block per split, findings with their first rows."""
    out = [f"data check: data={report['data']} phase={report['phase']} max_length={_fmt(report['max_length'])} "
           f"(lengths in {report['length_unit']})"]
    for s in report["splits"]:
        out.append(f"\n[{s['split']}] {s['source']}: {s['rows']} rows")
        for kind, names in (("error", ERRORS), ("warning", WARNINGS)):
            group = s["errors"] if kind == "error" else s["warnings"]
            for name in names:
                f = group.get(name)
                if not f or not f["count"]:
                    continue
                if name == "low_agreement":
                    out.append(f"  {kind}: {f['rows'][0]}")
                    continue
                out.append(f"  {kind}: {name}: {f['count']} {FINDINGS_TEXT[name]}")
                out.extend(f"    {row}" for row in f["rows"])
        clean = not any(g[n]["count"] for g in (s["errors"], s["warnings"]) for n in g)
        if clean:
            out.append("  ok: no schema errors, empty fields, identical, duplicate or over-long pairs")
        d = s["duplicate_prompts"]
        out.append(f"  prompts: {d['distinct_prompts']} distinct, {d['count']} rows repeat an earlier prompt")
        for part in ("prompt", "chosen", "rejected"):
            dist = s["lengths"][part]
            if dist:
                out.append(f"  {part:<8} {s['lengths']['unit']}: min {dist['min']}  median {_fmt(dist['median'])}  "
                           f"p95 {dist['p95']}  max {dist['max']}")
        if s["max_length"]["rule"] and not s["warnings"]["over_max_length"]["count"]:
            out.append(f"  length: every pair fits phase.max_length={s['max_length']['max_length']}")
        a = s.get("agreement")
        if a:
            line = (f"  agreement: {a['annotators']} annotators on {a['items']} pairs: percent agreement "
                    f"{_fmt(a['percent_agreement'])}, Cohen's kappa {_fmt(a['cohen_kappa'])}"
                    + (" (mean over annotator pairs)" if a["annotators"] > 2 else ""))
            if a["annotators"] > 2:
                line += f", Fleiss' kappa {_fmt(a['fleiss_kappa'])}"
            out.append(line + f": {a['verdict']}")
    status = "FAILED (errors above)" if report["failed"] else ("passed with warnings" if report["warned"] else "passed")
    out.append(f"\ndata check {status}")
    return "\n".join(out)


def summary(report: dict) -> dict[str, dict]:
    """Per split, the counts (and agreement) a run records in summary.json 'data.<split>.check'."""
    out = {}
    for s in report["splits"]:
        entry: dict[str, Any] = {"rows": s["rows"],
                                 **{k: v["count"] for k, v in s["errors"].items()},
                                 **{k: v["count"] for k, v in s["warnings"].items()},
                                 "duplicate_prompts": s["duplicate_prompts"]["count"]}
        firsts = [row for g in (s["errors"], s["warnings"]) for v in g.values() for row in v["rows"]]
        if firsts:
            entry["first_rows"] = firsts[:FIRST_ROWS]
        if s.get("agreement"):
            a = s["agreement"]
            entry["agreement"] = {k: a[k] for k in ("annotators", "percent_agreement", "cohen_kappa", "fleiss_kappa",
                                                    "verdict")}
        out[s["split"]] = entry
    return out


# ------------------------------------------------------------------------------------------- reusing

# the modules a report's content depends on: a change to any of them makes earlier reports stale
REPORT_CODE = ("check.py", "encode.py", "sources.py", "agreement.py")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in REPORT_CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str | None:
    """What the lengths depend on in a tokenizer: its vocabulary, merges, normalisation and special-token
    processing (the backend's whole spec, as its tokenizer.json holds it: 0.1 s of CPU measured for a 128k-token BPE
    vocabulary, a 4.3 MB spec), its chat template and its special tokens; "characters" without one; None when it has
    no backend spec (never cached)."""
    if tokenizer is None:
        return "characters"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token,
                              tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token, tokenizer.unk_token,
                              getattr(tokenizer, "split_special_tokens", None)], default=str).encode())
    return digest.hexdigest()


def report_key(cfg, tokenizer, read: list[Section]) -> str | None:
    """The key of a report: the rows (each split's identity), the data settings, the phase and its max_length, the
    tokenizer and the checking code; None when one of them has no identity (never cached)."""
    identities = [s.identity for s in read]
    tok = tokenizer_digest(tokenizer)
    if tok is None or not identities or None in identities:
        return None
    from rlhf_exp.data.loading import library_versions, plain_settings

    parts = [_code_digest(), library_versions(), tok, identities, plain_settings(cfg.data), str(cfg.phase.name),
             int(cfg.phase.max_length)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def reports_folder() -> Path:
    """Where reports are kept: beside the tokenised data sets TRL's trainers leave in datasets' cache (one setting
    moves both: HF_DATASETS_CACHE, or HF_HOME)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "rlhf_exp_data_check"


def reused_checks(cfg, tokenizer) -> tuple[dict, bool]:
    """(``run_checks(cfg, tokenizer)``, whether it was read back): the report of an earlier run on the same rows,
    settings and tokenizer when one was kept, else the checks run and their report kept. A run on a large set reads
    and tokenises every row (HH-RLHF's 160k pairs: ~1-2 min of CPU), so each sweep job and rerun would repeat it; a
    report that cannot be read back or kept is recomputed, never trusted half-written."""
    import logging

    from rlhf_exp.tracking.run import write_bytes_atomic

    log = logging.getLogger(__name__)
    read = sections(cfg.data)
    key = path = None
    try:
        key = report_key(cfg, tokenizer, read)
        path = reports_folder() / f"{key}.json" if key else None
        if path is not None and path.is_file():
            report = json.loads(path.read_text())
            if isinstance(report, dict) and report.get("key") == key:
                log.info("data check: the report of an identical earlier check, %s", path)
                return report["report"], True
    except Exception as exc:  # noqa: BLE001  (unreadable: permissions, half a file; a key that cannot be made)
        log.info("data check report not read back: %s: %s", type(exc).__name__, exc)
    report = run_checks(cfg, tokenizer, read=read)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # whole or not at all: concurrent sweep jobs each write a complete file
            write_bytes_atomic(path, json.dumps({"key": key, "report": report}).encode())
        except OSError as exc:
            log.info("data check report not kept in %s: %s", path.parent, exc)
    return report, False


def report_run(cfg, run, tokenizer) -> None:
    """RM/DPO runners: the same checks into the run's summary (``data.<split>.check``) and one warning line; the
    report of an identical earlier check is reused (``reused_checks``). Never stops a run: a check that cannot run
    is said and skipped."""
    import sys

    if not run.main:
        return
    try:
        with run.stage("data_check"):
            report, _ = reused_checks(cfg, tokenizer)
    except Exception as exc:  # noqa: BLE001  (the loader already accepted the data; the check only reports)
        print(f"rlhf_exp: warning: data check skipped ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        return
    for split, entry in summary(report).items():
        run.record_data(split, check=entry)
        problems = [f"{entry[k]} {k}" for k in (*ERRORS, *WARNINGS[:4]) if entry.get(k)]
        kappa = entry.get("agreement")
        if kappa and kappa["verdict"] == "poor":
            problems.append("annotator kappa below 0.4")
        if problems:
            print(f"rlhf_exp: warning: data check {split}: {', '.join(problems)} of {entry['rows']} rows "
                  f"(python -m rlhf_exp.data check; summary.json 'data.{split}.check')", file=sys.stderr)
