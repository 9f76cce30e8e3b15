"""Hub and JSONL loaders: layouts, split names, holdout, caps, counts and the error messages users see.

Configs come from the real presets through Hydra's compose; the hub is never called
(``datasets.load_dataset`` is replaced by a recorder returning small in-memory sets). Local copies of
hub data are small files written here in the public layouts of the hub repos:

* Anthropic/hh-rlhf: ``<subset>/train.jsonl.gz``, ``<subset>/test.jsonl.gz`` (subsets harmless-base,
  helpful-base, helpful-online, helpful-rejection-sampled; red-team-attempts/red_team_attempts.jsonl.gz
  has no split name and is not read), each line ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``; its README declares no configs.
* HuggingFaceH4/ultrafeedback_binarized: ``data/{train,test}_{prefs,sft,gen}-00000-of-00001-<hash>.parquet``
  with columns prompt (string), prompt_id (string), chosen/rejected/messages (list of {content, role}
  strings), score_chosen/score_rejected (float64); its README's ``configs`` maps each split to
  ``data/<split>-*``.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.config.schema import register_configs
from rlhf_exp.data.sources import check_data_files, load_preferences, load_sft

CONF = Path(__file__).resolve().parents[2] / "conf"


def data_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides)).data


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hub(monkeypatch):
    """Replace datasets.load_dataset; ``hub.splits[name] = rows``; ``hub.calls`` records the arguments."""

    class Hub:
        splits: dict[str, list[dict]] = {}
        calls: list[tuple] = []

    def fake_load_dataset(path, **kwargs):
        Hub.calls.append((path, kwargs))
        if kwargs["split"] not in Hub.splits:
            raise ValueError(f'Unknown split "{kwargs["split"]}". Should be one of {sorted(Hub.splits)}.')
        return datasets.Dataset.from_list(Hub.splits[kwargs["split"]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return Hub


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------- hh-rlhf

HH_CONTEXT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."


def hh_row(chosen: str = " Why did the chicken cross the road?", rejected: str = " No.") -> dict:
    return {"chosen": HH_CONTEXT + "\n\nAssistant:" + chosen, "rejected": HH_CONTEXT + "\n\nAssistant:" + rejected}


def test_hh_two_turn_transcript_to_preference_pair(hub):
    hub.splits = {"train": [hh_row()] * 3, "test": [hh_row(rejected=" Go away.")]}
    train, eval_ = load_preferences(data_cfg("data=hh_rlhf", "model=qwen2_5_7b"), seed=0)

    assert [(path, kw["split"]) for path, kw in hub.calls] == [("Anthropic/hh-rlhf", "train"),
                                                                ("Anthropic/hh-rlhf", "test")]
    assert hub.calls[0][1] == {"name": None, "data_dir": None, "revision": None, "split": "train"}
    assert train.column_names == ["prompt", "chosen", "rejected"]
    assert train[0]["prompt"] == [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke.")]
    assert train[0]["chosen"] == [bot("Why did the chicken cross the road?")]
    assert train[0]["rejected"] == [bot("No.")]
    assert eval_[0]["rejected"] == [bot("Go away.")]


def test_hh_sft_trains_on_the_chosen_final_turn(hub):
    hub.splits = {"train": [hh_row()], "test": [hh_row()]}
    train, _ = load_sft(data_cfg("data=hh_rlhf", "data.data_dir=harmless-base"), seed=0)

    assert hub.calls[0][1]["data_dir"] == "harmless-base"
    assert train.column_names == ["prompt", "completion"]
    assert train[0]["prompt"][-1] == user("Tell me a joke.")
    assert train[0]["completion"] == [bot("Why did the chicken cross the road?")]


def test_hh_hub_skips_odd_rows_with_one_warning(hub, caplog):
    no_answer = {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}
    tie = hh_row(chosen=" Same.", rejected=" Same.")
    hub.splits = {"train": [hh_row(), no_answer, tie, hh_row()], "test": [hh_row()]}
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.data.sources"):
        train, eval_ = load_preferences(data_cfg("data=hh_rlhf"), seed=0)

    assert len(train) == 2 and len(eval_) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 4" in warnings[0] and "split=train" in warnings[0]


def test_hub_split_with_no_readable_rows_is_an_error(hub):
    hub.splits = {"train": [{"chosen": "no turns", "rejected": "at all"}] * 3, "test": [hh_row()]}
    with pytest.raises(ConfigError, match=r"split=train: none of its 3 rows could be read as data.format=hh"):
        load_preferences(data_cfg("data=hh_rlhf"), seed=0)


def test_hh_local_unparseable_row_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [hh_row(), {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Yo"}])
    cfg = data_cfg("data=jsonl", f"data.train_file={path}", "data.format=hh")
    with pytest.raises(ConfigError, match=r"line 2: chosen: no final 'Assistant:' turn") as exc:
        load_preferences(cfg, seed=0)
    assert str(path) in str(exc.value)


# ------------------------------------------------------------------- ultrafeedback


def uf_row(i: int, turns: int = 1) -> dict:
    """Shaped like HuggingFaceH4/ultrafeedback_binarized (every split has every column)."""
    prompt = f"Question {i}?"
    history = [m for t in range(turns - 1) for m in (user(f"Earlier {i}.{t}"), bot(f"Reply {i}.{t}"))]
    return {"prompt": prompt, "prompt_id": f"id{i}",
            "chosen": [user(prompt), bot(f"Good answer {i}")], "rejected": [user(prompt), bot(f"Bad answer {i}")],
            "messages": history + [user(prompt), bot(f"Good answer {i}")],
            "score_chosen": 8.0, "score_rejected": 3.5}


def test_ultrafeedback_preferences_strip_the_shared_user_turn(hub):
    hub.splits = {"train_prefs": [uf_row(i) for i in range(4)], "test_prefs": [uf_row(9)]}
    train, eval_ = load_preferences(data_cfg("data=ultrafeedback_binarized", "model=qwen2_5_7b"), seed=0)

    assert [(p, kw["split"]) for p, kw in hub.calls] == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
                                                         ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")]
    assert train.column_names == ["prompt", "chosen", "rejected"]
    assert train[2] == {"prompt": [user("Question 2?")], "chosen": [bot("Good answer 2")],
                        "rejected": [bot("Bad answer 2")]}
    assert eval_[0]["prompt"] == [user("Question 9?")]


def test_ultrafeedback_sft_uses_messages(hub):
    hub.splits = {"train_sft": [uf_row(i, turns=2) for i in range(3)], "test_sft": [uf_row(7)]}
    train, eval_ = load_sft(data_cfg("data=ultrafeedback_binarized"), seed=0)

    assert [kw["split"] for _, kw in hub.calls] == ["train_sft", "test_sft"]
    assert train.column_names == ["prompt", "completion"]
    assert train[1]["prompt"] == [user("Earlier 1.0"), bot("Reply 1.0"), user("Question 1?")]
    assert train[1]["completion"] == [bot("Good answer 1")]
    assert eval_[0]["prompt"] == [user("Question 7?")]


def test_preference_sft_without_messages_uses_prompt_and_chosen(hub):
    rows = [{k: v for k, v in uf_row(i).items() if k != "messages"} for i in range(2)]
    hub.splits = {"train_sft": rows, "test_sft": rows}
    train, _ = load_sft(data_cfg("data=ultrafeedback_binarized"), seed=0)
    assert train[0] == {"prompt": [user("Question 0?")], "completion": [bot("Good answer 0")]}


def test_hub_null_eval_split_holds_out_train(hub):
    hub.splits = {"train_prefs": [uf_row(i) for i in range(20)]}
    cfg = data_cfg("data=ultrafeedback_binarized", "data.pref_eval_split=null", "data.eval_fraction=0.25")
    train, eval_ = load_preferences(cfg, seed=0)

    assert [kw["split"] for _, kw in hub.calls] == ["train_prefs"]
    assert (len(train), len(eval_)) == (15, 5)
    assert not {p[0]["content"] for p in train["prompt"]} & {p[0]["content"] for p in eval_["prompt"]}


def test_hub_unknown_split_names_the_setting(hub):
    hub.splits = {"train_prefs": [uf_row(0)]}
    with pytest.raises(ConfigError, match=r"data.pref_eval_split=test_prefs: Unknown split"):
        load_preferences(data_cfg("data=ultrafeedback_binarized"), seed=0)


def test_hub_missing_column_names_the_fix(hub):
    hub.splits = {"train": [{"text": "x"}], "test": [{"text": "x"}]}
    with pytest.raises(ConfigError, match=r"(?s)no column 'chosen'.*columns: text.*data.columns"):
        load_sft(data_cfg("data=hh_rlhf"), seed=0)


# ------------------------------------------------------------------ jsonl layouts

PREF = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
MSGS = {"messages": [{"role": "system", "content": "Be brief."}, user("2+2?"), bot("4")]}
PC = {"prompt": "2+2?", "completion": "4"}


def jsonl_cfg(train: Path, *overrides: str):
    return data_cfg("data=jsonl", f"data.train_file={train}", "data.eval_fraction=0", *overrides)


@pytest.mark.parametrize("row, expected", [
    (PREF, {"prompt": "2+2?", "completion": "4"}),
    (MSGS, {"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?")], "completion": [bot("4")]}),
    (PC, {"prompt": "2+2?", "completion": "4"}),
    ({"prompt": [user("2+2?")], "completion": "4"}, {"prompt": [user("2+2?")], "completion": [bot("4")]}),
], ids=["preference", "messages", "prompt_completion", "chat_prompt_text_completion"])
def test_jsonl_auto_detects_sft_layouts(tmp_path, row, expected):
    train, eval_ = load_sft(jsonl_cfg(write_jsonl(tmp_path / "t.jsonl", [row])), seed=0)
    assert eval_ is None
    assert train.column_names == ["prompt", "completion"] and train[0] == expected


def test_jsonl_auto_detects_preference_layout(tmp_path):
    rows = [PREF, {"prompt": [user("Hi")], "chosen": [user("Hi"), bot("Hello")], "rejected": "Go away"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows[:1])
    train, _ = load_preferences(jsonl_cfg(path), seed=0)
    assert train[0] == PREF
    chat, _ = load_preferences(jsonl_cfg(write_jsonl(tmp_path / "c.jsonl", rows[1:])), seed=0)
    assert chat[0] == {"prompt": [user("Hi")], "chosen": [bot("Hello")], "rejected": [bot("Go away")]}


def test_jsonl_renamed_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "2+2?", "good": "4", "bad": "5"}])
    cfg = jsonl_cfg(path, "data.columns.prompt=q", "data.columns.chosen=good", "data.columns.rejected=bad")
    assert load_preferences(cfg, seed=0)[0][0] == PREF


@pytest.mark.parametrize("row", [MSGS, PC], ids=["messages", "prompt_completion"])
def test_jsonl_sft_only_layouts_refuse_preference_phases(tmp_path, row):
    with pytest.raises(ConfigError, match=r"has no rejected answers.*format=preference"):
        load_preferences(jsonl_cfg(write_jsonl(tmp_path / "t.jsonl", [row])), seed=0)


def test_jsonl_auto_unknown_columns_lists_found_and_accepted(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ConfigError) as exc:
        load_sft(jsonl_cfg(path), seed=0)
    msg = str(exc.value)
    assert "line 1" in msg and "'question', 'answer'" in msg
    assert "prompt+chosen+rejected" in msg and "messages" in msg and "prompt+completion" in msg


# ------------------------------------------------------------- holdout and caps


def numbered(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]


def test_jsonl_eval_holdout_is_seeded_and_disjoint(tmp_path):
    cfg = data_cfg("data=jsonl", f"data.train_file={write_jsonl(tmp_path / 't.jsonl', numbered(40))}",
                   "data.eval_fraction=0.25")
    train_a, eval_a = load_sft(cfg, seed=0)
    train_b, eval_b = load_sft(cfg, seed=0)
    _, eval_c = load_sft(cfg, seed=1)

    assert (len(train_a), len(eval_a)) == (30, 10)
    assert eval_a["prompt"] == eval_b["prompt"] and train_a["prompt"] == train_b["prompt"]
    assert eval_a["prompt"] != eval_c["prompt"]
    assert sorted(list(train_a["prompt"]) + list(eval_a["prompt"])) == sorted(f"p{i}" for i in range(40))


def test_jsonl_eval_file_and_caps(tmp_path):
    train_file = write_jsonl(tmp_path / "t.jsonl", numbered(20))
    eval_file = write_jsonl(tmp_path / "e.jsonl", numbered(10))
    cfg = data_cfg("data=jsonl", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
                   "data.max_train_samples=5", "data.max_eval_samples=3")
    train, eval_ = load_sft(cfg, seed=0)
    again, _ = load_sft(cfg, seed=0)
    other, _ = load_sft(cfg, seed=1)

    assert (len(train), len(eval_)) == (5, 3)
    assert train["prompt"] == again["prompt"] and train["prompt"] != other["prompt"]
    assert set(train["prompt"]) <= {f"p{i}" for i in range(20)}
    assert train["prompt"] != [f"p{i}" for i in range(5)]  # shuffled before capping, not the head


def test_hub_caps_apply(hub):
    hub.splits = {"train_prefs": [uf_row(i) for i in range(30)], "test_prefs": [uf_row(i) for i in range(10)]}
    cfg = data_cfg("data=ultrafeedback_binarized", "data.max_train_samples=4", "data.max_eval_samples=2")
    train, eval_ = load_preferences(cfg, seed=3)
    assert (len(train), len(eval_)) == (4, 2)
    assert load_preferences(cfg, seed=3)[0]["prompt"] == train["prompt"]


# ---------------------------------------------------------------- jsonl errors


@pytest.mark.parametrize("lines, task, line_no, words", [
    ([PREF, "", '{"prompt": "a", "chosen": "b",', PREF], "pref", 3, "not valid JSON"),
    ([PREF, '["prompt", "chosen"]'], "pref", 2, "expected a JSON object"),
    ([PREF, {"prompt": "a", "chosen": "b"}], "pref", 2, "missing 'rejected'; data.format=preference needs"),
    ([PREF, "", {"prompt": "", "chosen": "b", "rejected": "c"}], "pref", 3, "prompt is an empty string"),
    ([PC, {"prompt": "a", "completion": "  "}], "sft", 2, "completion is an empty string"),
    ([PREF, {"prompt": "a", "chosen": "same", "rejected": "same"}], "pref", 2, "chosen and rejected are identical"),
    ([MSGS, {"messages": [user("a"), {"role": "assistant", "text": "b"}]}], "sft", 2,
     'messages: message 2 is not a {"role": str, "content": str} object'),
    ([MSGS, {"messages": [user("a"), user("b")]}], "sft", 2, "final message is a 'user' turn"),
    ([PC, {"prompt": [user("a")], "completion": [bot("b")]}], "sft", 2, "conversational record after standard"),
], ids=["json", "not_object", "missing_column", "empty_prompt", "empty_completion", "identical", "bad_message",
        "no_final_assistant", "mixed_kinds"])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, task, line_no, words):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    loader = load_sft if task == "sft" else load_preferences
    with pytest.raises(ConfigError) as exc:
        loader(jsonl_cfg(path), seed=0)
    msg = str(exc.value)
    assert f"data.train_file={path} line {line_no}:" in msg
    assert words in msg


def test_jsonl_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(PC).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(ConfigError, match=r"line 2: not valid UTF-8 \(byte 0xe9"):
        load_sft(jsonl_cfg(path), seed=0)


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"data.train_file=.*empty.jsonl: empty file"):
        load_sft(jsonl_cfg(path), seed=0)


def test_jsonl_eval_file_errors_name_the_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [PC])
    eval_file = write_jsonl(tmp_path / "e.jsonl", [PC, PC, "{oops"])
    cfg = data_cfg("data=jsonl", f"data.train_file={train}", f"data.eval_file={eval_file}")
    with pytest.raises(ConfigError, match=rf"data.eval_file={eval_file} line 3: not valid JSON"):
        load_sft(cfg, seed=0)


# ------------------------------------------------------------- file checks, sources


def test_check_data_files(tmp_path):
    present = write_jsonl(tmp_path / "t.jsonl", [PC])
    check_data_files(data_cfg("data=jsonl", f"data.train_file={present}"))
    check_data_files(data_cfg("data=hh_rlhf"))  # hub data has no local files
    with pytest.raises(ConfigError, match=r"data.train_file=.*nope.jsonl: no such file"):
        check_data_files(data_cfg("data=jsonl", f"data.train_file={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(ConfigError, match=r"data.eval_file=.*gone.jsonl: no such file"):
        check_data_files(data_cfg("data=jsonl", f"data.train_file={present}",
                                  f"data.eval_file={tmp_path / 'gone.jsonl'}"))
    with pytest.raises(ConfigError, match=r"needs a training file: add data.train_file="):
        check_data_files(data_cfg("data=jsonl"))


def test_synthetic_source_is_not_handled_here():
    with pytest.raises(ValueError, match="synthetic"):
        load_sft(data_cfg("data=synthetic"), seed=0)


# ------------------------------------------------- local copies of hub data (data.path=<file or folder>)

UF_MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
UF_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", UF_MESSAGES),
                       ("rejected", UF_MESSAGES), ("messages", UF_MESSAGES), ("score_chosen", pa.float64()),
                       ("score_rejected", pa.float64())])
# the configs block of HuggingFaceH4/ultrafeedback_binarized's README.md (a full snapshot has it)
UF_README = "---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
    f"  - split: {split}\n    path: data/{split}-*\n"
    for split in ("train_prefs", "train_sft", "test_prefs", "test_sft", "train_gen", "test_gen")) + "---\n"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Local copies are prepared by datasets into its cache: a fresh one per test, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def hh_rows(n: int, tag: str = "") -> list[dict]:
    return [hh_row(chosen=f" Joke {tag}{i}.", rejected=f" No {tag}{i}.") for i in range(n)]


def write_hh(path: Path, rows: list[dict]) -> Path:
    """HH's own files: JSON Lines, gzipped when the name ends in .gz (train.jsonl.gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")  # one JSON array
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def hh_snapshot(root: Path, subsets: dict[str, tuple[int, int]]) -> Path:
    """A local copy of Anthropic/hh-rlhf: <subset>/{train,test}.jsonl.gz, red-team-attempts, a README."""
    for subset, (n_train, n_test) in subsets.items():
        write_hh(root / subset / "train.jsonl.gz", hh_rows(n_train, f"{subset} train "))
        write_hh(root / subset / "test.jsonl.gz", hh_rows(n_test, f"{subset} test "))
    red_team = root / "red-team-attempts" / "red_team_attempts.jsonl.gz"
    red_team.parent.mkdir(parents=True)
    red_team.write_bytes(gzip.compress(json.dumps([{"transcript": "\n\nHuman: Hi", "rating": 0}]).encode()))
    (root / "README.md").write_text("---\nlicense: mit\ntags:\n- human-feedback\n---\n# Dataset Card for HH-RLHF\n")
    return root


def write_uf(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=UF_SCHEMA), path)
    return path


def uf_snapshot(root: Path, splits: dict[str, int], readme: bool = True) -> Path:
    """A local copy of HuggingFaceH4/ultrafeedback_binarized: data/<split>-00000-of-00001-<hash>.parquet."""
    for n, (split, rows) in enumerate(splits.items()):
        start = 1000 * n
        write_uf(root / "data" / f"{split}-00000-of-00001-{n:016x}.parquet",
                 [uf_row(i) for i in range(start, start + rows)])
    if readme:
        (root / "README.md").write_text(UF_README)
    return root


def prompts(ds) -> list[str]:
    return [p[-1]["content"] for p in ds["prompt"]]


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz", "train.json", "train.parquet"])
def test_hh_single_local_file_is_train_with_eval_held_out(tmp_path, caplog, name):
    path = write_hh(tmp_path / name, hh_rows(20))
    cfg = data_cfg("data=hh_rlhf", f"data.path={path}", "data.eval_fraction=0.25")
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.data.sources"):
        train, eval_ = load_preferences(cfg, seed=0)
        sft_train, sft_eval = load_sft(cfg, seed=0)

    assert (len(train), len(eval_)) == (15, 5) and (len(sft_train), len(sft_eval)) == (15, 5)
    assert train[0]["prompt"] == [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke.")]
    answers = sorted(c[0]["content"] for c in list(train["chosen"]) + list(eval_["chosen"]))
    assert answers == sorted(f"Joke {i}." for i in range(20))
    assert not {c[0]["content"] for c in train["chosen"]} & {c[0]["content"] for c in eval_["chosen"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per load
    assert warnings[0] == (f"data.path={path} is a single file, read as the train split: holding out 5 of its 20 "
                           f"rows for eval (data.eval_fraction=0.25, seed 0).")
    assert load_preferences(cfg, seed=0)[1]["chosen"] == eval_["chosen"]  # seeded


def test_hh_local_snapshot_folder_reads_train_and_test_of_every_subset(tmp_path):
    root = hh_snapshot(tmp_path / "hh-rlhf", {"harmless-base": (4, 2), "helpful-base": (3, 1)})
    train, eval_ = load_preferences(data_cfg("data=hh_rlhf", f"data.path={root}"), seed=0)

    assert (len(train), len(eval_)) == (7, 3)  # red_team_attempts.jsonl.gz carries no split name: not read
    chosen = {c[0]["content"] for c in train["chosen"]}
    assert "Joke harmless-base train 0." in chosen and "Joke helpful-base train 2." in chosen
    assert {c[0]["content"] for c in eval_["chosen"]} == {
        "Joke harmless-base test 0.", "Joke harmless-base test 1.", "Joke helpful-base test 0."}


def test_hh_local_subset_folder_with_data_dir(tmp_path):
    root = hh_snapshot(tmp_path / "hh-rlhf", {"harmless-base": (4, 2), "helpful-base": (3, 1)})
    train, eval_ = load_sft(data_cfg("data=hh_rlhf", f"data.path={root}", "data.data_dir=helpful-base"), seed=0)

    assert (len(train), len(eval_)) == (3, 1)
    assert train.column_names == ["prompt", "completion"]
    assert {c[0]["content"] for c in train["completion"]} == {f"Joke helpful-base train {i}." for i in range(3)}
    assert eval_[0]["completion"] == [bot("Joke helpful-base test 0.")]


def test_ultrafeedback_local_snapshot_folder_uses_the_configured_splits(tmp_path):
    root = uf_snapshot(tmp_path / "ultrafeedback_binarized",
                       {"train_prefs": 4, "test_prefs": 2, "train_sft": 3, "test_sft": 1, "train_gen": 2, "test_gen": 1})
    cfg = data_cfg("data=ultrafeedback_binarized", f"data.path={root}")
    train, eval_ = load_preferences(cfg, seed=0)
    sft_train, sft_eval = load_sft(cfg, seed=0)

    assert (len(train), len(eval_), len(sft_train), len(sft_eval)) == (4, 2, 3, 1)
    assert train[0] == {"prompt": [user("Question 0?")], "chosen": [bot("Good answer 0")],
                        "rejected": [bot("Bad answer 0")]}
    assert prompts(eval_) == ["Question 1000?", "Question 1001?"]
    assert prompts(sft_train) == ["Question 2000?", "Question 2001?", "Question 2002?"]
    assert sft_eval[0]["completion"] == [bot("Good answer 3000")]


def test_ultrafeedback_local_folder_without_eval_split_holds_it_out_of_train(tmp_path, caplog):
    root = uf_snapshot(tmp_path / "uf", {"train_prefs": 20}, readme=False)  # split names from the file names
    cfg = data_cfg("data=ultrafeedback_binarized", f"data.path={root}", "data.eval_fraction=0.25")
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.data.sources"):
        train, eval_ = load_preferences(cfg, seed=0)

    assert (len(train), len(eval_)) == (15, 5)
    assert not set(prompts(train)) & set(prompts(eval_))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"data.path={root} has no 'test_prefs' split (data.pref_eval_split; splits found: train_prefs), "
                       f"so it comes out of 'train_prefs': holding out 5 of its 20 rows for eval "
                       f"(data.eval_fraction=0.25, seed 0).")


def test_local_folder_without_the_train_split_names_the_key_and_the_splits(tmp_path):
    root = uf_snapshot(tmp_path / "uf", {"train_prefs": 3, "test_prefs": 1}, readme=False)
    with pytest.raises(ConfigError) as exc:
        load_sft(data_cfg("data=ultrafeedback_binarized", f"data.path={root}"), seed=0)
    assert str(exc.value) == (f"data.sft_train_split=train_sft: data.path={root} has no such split (splits found: "
                              f"test_prefs, train_prefs). Set data.sft_train_split to one of them, e.g. "
                              f"data.sft_train_split=train_prefs.")
    hh = hh_snapshot(tmp_path / "hh", {"harmless-base": (2, 1)})
    with pytest.raises(ConfigError, match=r"data.pref_train_split=train_prefs: .* \(splits found: train, test\)"):
        load_preferences(data_cfg("data=ultrafeedback_binarized", f"data.path={hh}"), seed=0)
    (root / "README.md").write_text(UF_README)  # the hub's README, its other splits' files not downloaded
    with pytest.raises(ConfigError, match=r"(?s)^data.path=.*: cannot tell its splits \(Couldn't infer .*\)\.\n"
                                          r"Its README.md may name splits whose files are missing"):
        load_preferences(data_cfg("data=ultrafeedback_binarized", f"data.path={root}"), seed=0)


def test_ultrafeedback_single_local_parquet_file(tmp_path):
    path = write_uf(tmp_path / "train_prefs-00000-of-00001-17309c769bfe5733.parquet",
                    [uf_row(i, turns=2) for i in range(10)])
    cfg = data_cfg("data=ultrafeedback_binarized", f"data.path={path}", "data.eval_fraction=0.2")
    train, eval_ = load_preferences(cfg, seed=0)
    sft_train, _ = load_sft(cfg, seed=0)

    assert (len(train), len(eval_)) == (8, 2)
    assert train.column_names == ["prompt", "chosen", "rejected"] and len(train[0]["prompt"]) == 1
    i = prompts(sft_train)[0][len("Question "):-1]  # SFT reads messages: earlier turns are in the prompt
    assert sft_train[0]["prompt"] == [user(f"Earlier {i}.0"), bot(f"Reply {i}.0"), user(f"Question {i}?")]


def test_local_copy_rows_that_cannot_be_read_are_skipped_like_hub_rows(tmp_path, caplog):
    rows = [*hh_rows(3), {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}]
    path = write_hh(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.data.sources"):
        train, _ = load_preferences(data_cfg("data=hh_rlhf", f"data.path={path}", "data.eval_fraction=0.25"), seed=0)
    assert len(train) == 2  # 4 rows: 1 held out, then 1 of the 3 left unreadable (which side is seeded)
    assert any("skipped 1 of 3 rows: 1 unreadable as data.format=hh" in r.getMessage() for r in caplog.records)


def test_local_copy_that_is_not_data_is_one_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(ConfigError, match=rf"^data.path={path}: cannot read it \(ArrowInvalid: JSON parse error"):
        load_preferences(data_cfg("data=hh_rlhf", f"data.path={path}"), seed=0)


# ------------------------------------------------------------------- hh auto-detection


def test_jsonl_auto_detects_hh_transcripts(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(2))
    train, _ = load_preferences(jsonl_cfg(path), seed=0)
    assert train[1] == {"prompt": [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke.")],
                        "chosen": [bot("Joke 1.")], "rejected": [bot("No 1.")]}
    sft, _ = load_sft(jsonl_cfg(path), seed=0)
    assert sft[0]["completion"] == [bot("Joke 0.")]


def test_jsonl_chosen_rejected_text_without_prompt_lists_hh_in_the_message(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"chosen": "Paris.", "rejected": "Rome."}])
    with pytest.raises(ConfigError) as exc:
        load_preferences(jsonl_cfg(path), seed=0)
    assert str(exc.value) == (
        f"data.train_file={path} line 1: cannot tell the layout from columns 'chosen', 'rejected'. Accepted: "
        f"prompt+chosen+rejected (preference); messages (messages); prompt+completion (prompt_completion); "
        f"chosen+rejected transcripts (hh).\nRename them with data.columns.<field>=<column>, or set data.format "
        f"(data.format=hh for \"Human: ... Assistant: ...\" transcripts).")


def test_hub_auto_detects_hh(hub):
    hub.splits = {"train": [hh_row()], "test": [hh_row(rejected=" Go away.")]}
    train, _ = load_preferences(data_cfg("data=hh_rlhf", "data.format=auto"), seed=0)
    assert train[0]["chosen"] == [bot("Why did the chicken cross the road?")]


def test_local_copy_auto_detects_hh(tmp_path):
    path = write_hh(tmp_path / "train.parquet", hh_rows(4))
    train, _ = load_preferences(data_cfg("data=ultrafeedback_binarized", f"data.path={path}", "data.format=auto",
                                         "data.eval_fraction=0.25"), seed=0)
    assert len(train) == 3 and train[0]["prompt"][-1] == user("Tell me a joke.")


# ----------------------------------------------------------------------------- counts


def test_counts_jsonl_holdout_identical_pair_and_caps(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    rows[3] = {"prompt": "p3", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    counts: dict = {}
    train, eval_ = load_preferences(data_cfg("data=jsonl", f"data.train_file={path}", "data.eval_fraction=0.25",
                                             "data.max_train_samples=10"), seed=0, counts=counts)
    # 20 read, 1 identical dropped, 5 of the 19 held out (counted as eval's), 14 capped to 10
    assert counts == {"train": {"loaded": 15, "kept": 10, "dropped": {"identical_pair": 1, "capped": 4}},
                      "eval": {"loaded": 5, "kept": 5, "dropped": {}}}
    assert (len(train), len(eval_)) == (10, 5)


def test_counts_jsonl_eval_file_and_no_eval(tmp_path):
    train_file = write_jsonl(tmp_path / "t.jsonl", numbered(6))
    eval_file = write_jsonl(tmp_path / "e.jsonl", numbered(4))
    counts: dict = {}
    load_sft(data_cfg("data=jsonl", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
                      "data.max_eval_samples=3"), seed=0, counts=counts)
    assert counts == {"train": {"loaded": 6, "kept": 6, "dropped": {}},
                      "eval": {"loaded": 4, "kept": 3, "dropped": {"capped": 1}}}
    counts = {}
    load_sft(jsonl_cfg(train_file), seed=0, counts=counts)  # eval_fraction=0: no eval split
    assert counts == {"train": {"loaded": 6, "kept": 6, "dropped": {}}, "eval": None}


def test_counts_hub_unreadable_identical_and_capped(hub):
    no_answer = {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}
    tie = hh_row(chosen=" Same.", rejected=" Same.")
    hub.splits = {"train": [*hh_rows(6), no_answer, tie], "test": [*hh_rows(3, "t"), no_answer]}
    counts: dict = {}
    train, eval_ = load_preferences(data_cfg("data=hh_rlhf"), seed=0, counts=counts)
    assert counts == {"train": {"loaded": 8, "kept": 6, "dropped": {"unreadable": 1, "identical_pair": 1}},
                      "eval": {"loaded": 4, "kept": 3, "dropped": {"unreadable": 1}}}
    assert (len(train), len(eval_)) == (6, 3)

    counts = {}
    train, _ = load_preferences(data_cfg("data=hh_rlhf", "data.max_train_samples=5"), seed=0, counts=counts)
    tally = counts["train"]
    assert tally["loaded"] == 8 and tally["kept"] == len(train) and tally["dropped"]["capped"] == 3
    assert tally["loaded"] == tally["kept"] + sum(tally["dropped"].values())


def test_counts_local_copy_with_held_out_eval(tmp_path):
    rows = [*hh_rows(18), {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"},
            hh_row(chosen=" Same.", rejected=" Same.")]
    counts: dict = {}
    load_preferences(data_cfg("data=hh_rlhf", f"data.path={write_hh(tmp_path / 'train.jsonl.gz', rows)}",
                              "data.eval_fraction=0.25"), seed=0, counts=counts)
    assert counts["train"]["loaded"] + counts["eval"]["loaded"] == 20 and counts["eval"]["loaded"] == 5
    for tally in counts.values():
        assert tally["loaded"] == tally["kept"] + sum(tally["dropped"].values())
    dropped = [counts[s]["dropped"] for s in ("train", "eval")]
    assert sum(d.get("unreadable", 0) for d in dropped) == 1 and sum(d.get("identical_pair", 0) for d in dropped) == 1


# ------------------------------------------------------------------ local path checks


def test_check_data_files_refuses_missing_local_copies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hh = hh_snapshot(tmp_path / "hh-rlhf", {"harmless-base": (1, 1)})
    check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh}"))
    check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh}", "data.data_dir=harmless-base"))
    check_data_files(data_cfg("data=hh_rlhf", "data.path=hh-rlhf"))  # relative, on disk
    check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh / 'harmless-base' / 'train.jsonl.gz'}"))
    check_data_files(data_cfg("data=ultrafeedback_binarized"))  # a hub id: nothing to check here

    for missing in (str(tmp_path / "nope"), "./nope", "data/hh-rlhf/train.jsonl",
                    "hh-rlhf/harmless-base/none.jsonl.gz", "train.jsonl"):
        with pytest.raises(ConfigError) as exc:
            check_data_files(data_cfg("data=hh_rlhf", f"data.path={missing}"))
        assert str(exc.value).startswith(f"data.path={missing}: no such file or folder (looked in /")
        assert "Fix the path to your local copy, or give a hub id (org/name)." in str(exc.value)

    with pytest.raises(ConfigError, match=r"^data.data_dir=harmless: no such folder in data.path=.*\(folders: "
                                          r"harmless-base, red-team-attempts\). Fix data.data_dir"):
        check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh}", "data.data_dir=harmless"))
    with pytest.raises(ConfigError, match=r"data.data_dir=harmless-base: picks a subfolder .* is a file"):
        check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh / 'harmless-base' / 'test.jsonl.gz'}",
                                  "data.data_dir=harmless-base"))
    with pytest.raises(ConfigError, match=r"data.path=.*README.md: cannot read this kind of file"):
        check_data_files(data_cfg("data=hh_rlhf", f"data.path={hh / 'README.md'}"))
    with pytest.raises(ConfigError, match=r"no such file or folder"):  # loading checks too
        load_preferences(data_cfg("data=hh_rlhf", f"data.path={tmp_path / 'gone.jsonl'}"), seed=0)


# ----------------------------------------------------------------------- kept on disk


def test_in_memory_sets_are_kept_on_disk_under_their_content(monkeypatch, tmp_path):
    """on_disk: the same rows, built again (another run, a sweep job), land on the same file, so that what a trainer
    maps from them is read back instead of computed again; other rows never do. Sets read from files already, a
    cache that cannot be written and datasets' caching switched off leave the set as it was."""
    from rlhf_exp.data.loading import on_disk

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "a"}]}
            for i in range(50)]
    built = datasets.Dataset.from_list(rows)
    kept = on_disk(built)
    assert kept.cache_files and kept.to_list() == rows and kept.features == built.features
    (file,) = [Path(f["filename"]) for f in kept.cache_files]
    assert file.is_relative_to(tmp_path / "cache")
    assert [Path(f["filename"]) for f in on_disk(datasets.Dataset.from_list(rows)).cache_files] == [file]
    assert Path(on_disk(datasets.Dataset.from_list(rows[:-1])).cache_files[0]["filename"]) != file
    # a view (a held-out split, a cap) is kept as the rows it shows: the same file as those rows built directly
    train, held = built.train_test_split(test_size=10, seed=0).values()
    assert on_disk(train).to_list() == train.to_list() and on_disk(held).to_list() == held.to_list()
    assert on_disk(held).cache_files == on_disk(datasets.Dataset.from_list(held.to_list())).cache_files
    assert on_disk(kept) is kept and on_disk(None) is None
    # a file already there is kept as it is (a reader may have it mapped); one cut short is written again
    inode = file.stat().st_ino
    assert on_disk(datasets.Dataset.from_list(rows)).to_list() == rows and file.stat().st_ino == inode
    file.write_bytes(file.read_bytes()[:100])
    assert on_disk(datasets.Dataset.from_list(rows)).to_list() == rows
    assert not list(file.parent.glob(".*.tmp")), "temporary files left behind"

    calls = str(tmp_path / "calls")  # counted in a file: state the function holds would change its fingerprint

    def tokenise(row):
        with open(calls, "a") as f:
            f.write(".")
        return {"n": len(row["prompt"][0]["content"])}

    first = on_disk(datasets.Dataset.from_list(rows)).map(tokenise)
    again = on_disk(datasets.Dataset.from_list(rows)).map(tokenise)
    assert Path(calls).read_text() == "." * 50, "the second map was computed again, not read back"
    assert again["n"] == first["n"] and again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    assert datasets.Dataset.from_list(rows).map(tokenise)["n"] == first["n"] and len(Path(calls).read_text()) == 100

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(blocked))
    assert on_disk(built) is built
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "is_caching_enabled", lambda: False)
    assert on_disk(built) is built
