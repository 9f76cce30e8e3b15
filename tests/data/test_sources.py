"""Hub and JSONL loaders: layouts, split names, holdout, caps and the error messages users see.

Configs come from the real presets through Hydra's compose; the hub is never called
(``datasets.load_dataset`` is replaced by a recorder returning small in-memory sets).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
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
