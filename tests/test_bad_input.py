"""Issue #5's bad-input rows (the README's "Bad input: what you get" table): each gives one or two lines
naming the key, file or line and the fix; through the CLI, exit status 2 and no traceback.

Text data needs a non-embedded model, so runs here point ``model=qwen2_5_7b`` at a local folder holding
the tiny model and tokenizer (no chat template): the real loading path, nothing downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.data.sources import load_preferences, load_sft
from tests.conftest import run_cli

PC = {"prompt": "1 2", "completion": "1 2"}
PREF = {"prompt": "2 1", "chosen": "1 2", "rejected": "2 1"}
JSONL_RUN = ["data=jsonl", "model=qwen2_5_7b", "model.dtype=float32"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """The tiny model saved like any hub model; its tokenizer has no chat template."""
    from rlhf_exp.cli import compose
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("local_model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(OmegaConf.to_object(compose([])).model, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def fake_run(root: Path, run_id: str, phase: str, checkpoint: Path | None = None) -> Path:
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "phase": phase, "status": "succeeded",
        "checkpoint": str(checkpoint or folder / "checkpoints" / "final")}))
    return folder


def cli_error(args: list[str], tmp_path: Path) -> str:
    """Run the CLI; it must exit 2 with one or two lines and no traceback. Returns those lines."""
    proc = run_cli([*args, f"output_root={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    block = proc.stderr[proc.stderr.index("rlhf_exp: error: "):].strip()
    assert len(block.splitlines()) <= 2, block
    return block


def data_cfg(compose, path: Path, *overrides: str):
    return compose(["data=jsonl", f"data.train_file={path}", *overrides]).data


def load_error(loader, cfg) -> str:
    with pytest.raises(ConfigError) as info:
        loader(cfg, seed=0)
    return str(info.value)


# ------------------------------------------------------------------------------------ data files


def test_malformed_jsonl_names_file_and_line(tmp_path, local_model):
    path = write_jsonl(tmp_path / "train.jsonl", [PC, "", '{"prompt": "1 2", "completion": '])
    message = cli_error([*JSONL_RUN, f"model.path={local_model}", f"data.train_file={path}"], tmp_path)
    assert message == (f"rlhf_exp: error: data.train_file={path} line 3: not valid JSON (Expecting value at column 33). "
                       "Each line must hold one JSON object.")


def test_missing_column_names_line_column_and_rename(compose, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [PREF, {"prompt": "1 2", "chosen": "1 2"}])
    assert load_error(load_preferences, data_cfg(compose, path)) == (
        f"data.train_file={path} line 2: missing 'rejected'; data.format=preference needs 'prompt', 'chosen', "
        "'rejected' on every line (rename with data.columns.<field>=<your column>).")
    renamed = data_cfg(compose, path, "data.format=preference", "data.columns.chosen=better")
    assert "line 1: missing 'better'" in load_error(load_preferences, renamed)


@pytest.mark.parametrize("row, words", [
    ({"prompt": "", "chosen": "1 2", "rejected": "2 1"}, "prompt is an empty string."),
    ({"prompt": "2 1", "chosen": "  ", "rejected": "2 1"}, "chosen is an empty string."),
    ({"prompt": [{"role": "user", "content": " "}], "chosen": "1 2", "rejected": "2 1"},
     "prompt: message 1 (user) is an empty string."),
    ({"prompt": "2 1", "chosen": [{"role": "assistant", "content": ""}], "rejected": "2 1"},
     "chosen: message 1 (assistant) is an empty string."),
], ids=["prompt", "blank_answer", "chat_prompt", "chat_answer"])
def test_empty_strings_name_field_and_line(compose, tmp_path, row, words):
    path = write_jsonl(tmp_path / "train.jsonl", [PREF, row])
    message = load_error(load_preferences, data_cfg(compose, path))
    assert message == f"data.train_file={path} line 2: {words} Fill it in or remove the record."


def test_non_utf8_names_line_byte_and_fix(compose, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(PC).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    assert load_error(load_sft, data_cfg(compose, path)) == (
        f"data.train_file={path} line 2: not valid UTF-8 (byte 0xe9 at column 16). Save the file as UTF-8.")


def test_identical_pairs_are_dropped_with_a_counted_warning(compose, tmp_path, caplog):
    rows = [{**PREF, "prompt": f"{i} 1"} for i in range(20)]
    rows[6] = {"prompt": "same", "chosen": "1 3", "rejected": "1 3"}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf_exp.data.sources"):
        train, eval_ = load_preferences(data_cfg(compose, path), seed=0)
    assert len(train) + len(eval_) == 19 and "same" not in list(train["prompt"]) + list(eval_["prompt"])
    assert [r.getMessage() for r in caplog.records] == [
        f"data.train_file={path}: dropped 1 of 20 records whose chosen and rejected are identical (lines 7): "
        "they carry no preference"]


def test_identical_pairs_above_10_percent_are_refused(tmp_path, local_model):
    """Through DPO: past the parent check, the tokenizer, and into the preference loader."""
    sft = fake_run(tmp_path, "local_sft", "sft", checkpoint=local_model)
    path = write_jsonl(tmp_path / "prefs.jsonl", [PREF, {**PREF, "rejected": "1 2"}])
    message = cli_error([*JSONL_RUN, "phase=dpo", f"phase.sft_run={sft}", f"data.train_file={path}"], tmp_path)
    assert message == (f"rlhf_exp: error: data.train_file={path} line 2: chosen and rejected are identical in 1 of 2 "
                       "records (lines 2), over 10%: are data.columns.chosen/rejected the same column? Fix the columns, "
                       "or remove those records.")


# ---------------------------------------------------------------------------- models and runs


def test_tokenizer_without_chat_template_given_chat_data(compose, local_model):
    from datasets import Dataset

    from rlhf_exp.models import check_chat_template, load_tokenizer

    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "2 1"}],
                               "completion": [{"role": "assistant", "content": "1 2"}]}])
    cfg = OmegaConf.to_object(compose(["model=qwen2_5_7b", f"model.path={local_model}"]))
    tokenizer = load_tokenizer(cfg.model)
    with pytest.raises(ConfigError) as info:
        check_chat_template(tokenizer, cfg.model, chat)
    assert str(info.value) == (f"model.path={local_model}: its tokenizer has no chat template, and the data are chat "
                               "messages.\nSet model.chat_template=chatml (or a .jinja file), or give the data as "
                               "plain strings.")
    check_chat_template(tokenizer, cfg.model, Dataset.from_list([PC]))  # plain strings need no template
    fixed = OmegaConf.to_object(compose(["model=qwen2_5_7b", f"model.path={local_model}", "model.chat_template=chatml"]))
    check_chat_template(load_tokenizer(fixed.model), fixed.model, chat)
    # a parent checkpoint saved without a template gets the one the child names
    check_chat_template(load_tokenizer(fixed.model, checkpoint=str(local_model)), fixed.model, chat)


def test_chat_data_with_a_template_less_tokenizer_through_the_cli(local_model, tmp_path):
    chat = {"prompt": [{"role": "user", "content": "2 1"}], "completion": [{"role": "assistant", "content": "1 2"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [chat] * 20)
    message = cli_error([*JSONL_RUN, f"model.path={local_model}", f"data.train_file={data}"], tmp_path)
    assert message == (f"rlhf_exp: error: model.path={local_model}: its tokenizer has no chat template, and the data "
                       "are chat messages.\nSet model.chat_template=chatml (or a .jinja file), or give the data as plain "
                       "strings.")


def test_model_path_that_does_not_exist(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [PC] * 20)
    missing = tmp_path / "no" / "such" / "checkpoint"
    message = cli_error([*JSONL_RUN, f"model.path={missing}", f"data.train_file={data}"], tmp_path)
    assert message == (f"rlhf_exp: error: model.path={missing}: no such folder. Fix the path (a folder saved with "
                       "save_pretrained, e.g. a run's checkpoints/final), or give a hub id (org/name).")


def test_parent_run_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "gone"
    message = cli_error(["phase=dpo", f"phase.sft_run={missing}"], tmp_path)
    assert message == (f"rlhf_exp: error: phase.sft_run={missing} is neither a run folder nor a run id under {tmp_path}/. "
                       "Give a run of phase=sft (its folder, holding manifest.json, or its run id), or leave "
                       "phase.sft_run out to use the latest.")
    fake_run(tmp_path, "moved_sft", "sft")  # its manifest names a checkpoint that is not there
    message = cli_error(["phase=dpo", "phase.sft_run=moved_sft"], tmp_path)
    assert "phase.sft_run: run " in message and "has no checkpoint at" in message and "pick another run" in message


def test_rm_run_given_where_an_sft_run_is_expected(tmp_path):
    sft, rm = fake_run(tmp_path, "a_sft", "sft"), fake_run(tmp_path, "b_rm", "rm")
    for folder in (sft, rm):
        (folder / "checkpoints" / "final").mkdir(parents=True)
    message = cli_error(["phase=dpo", f"phase.sft_run={rm}"], tmp_path)
    assert message == (f"rlhf_exp: error: phase.sft_run={rm} is a run of phase=rm; phase.sft_run needs a run of "
                       "phase=sft. Give a run of phase=sft, or leave phase.sft_run out to use the latest.")
    message = cli_error(["phase=ppo", f"phase.sft_run={sft}", f"phase.reward_run={sft}"], tmp_path)
    assert "is a run of phase=sft; phase.reward_run needs a run of phase=rm. Give a run of phase=rm" in message


@pytest.mark.parametrize("args, expected", [
    (["phase=dpo", "phase.beta=0.1,high"], "phase.beta: 'high' is not a valid float. e.g. phase.beta=0.1"),
    (["phase=dpo", "phase.beta=choice(0.1,high)"], "phase.beta: 'high' is not a valid float. e.g. phase.beta=0.1"),
    (["phase.max_steps=10,1.5"], "phase.max_steps: '1.5' is not a valid integer."),
    (["hardware.lora=true,maybe"], "hardware.lora: 'maybe' is not a valid bool. Use hardware.lora=true or"),
], ids=["float", "choice", "int", "bool"])
def test_sweep_value_of_the_wrong_type(tmp_path, args, expected):
    message = cli_error(["-m", *args], tmp_path)
    assert message.startswith(f"rlhf_exp: error: {expected}")
    assert not list(tmp_path.iterdir()), "no job may start when one swept value is bad"


# ------------------------------------------------------------------- issue 13: smaller messages


def test_one_record_file_says_what_works(tmp_path, local_model):
    """No data.eval_fraction splits 1 record (and 0 is refused by the config check): say what works."""
    path = write_jsonl(tmp_path / "train.jsonl", [PC])
    message = cli_error([*JSONL_RUN, f"model.path={local_model}", f"data.train_file={path}"], tmp_path)
    assert message == (f"rlhf_exp: error: data.train_file={path}: 1 record cannot be split into train and eval; holding "
                       "out an eval set (data.eval_fraction) needs at least 2 records. Add records, or give an eval set: "
                       "data.eval_file=<file> (may be the train file itself).")
    assert "lower data.eval_fraction" not in message


def test_one_record_file_with_itself_as_eval_file_loads(compose, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [PC])
    train, eval_ = load_sft(data_cfg(compose, path, f"data.eval_file={path}"), seed=0)
    assert len(train) == len(eval_) == 1


def test_too_large_eval_fraction_says_how_low_to_go(compose, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [PC] * 2)
    assert load_error(load_sft, data_cfg(compose, path, "data.eval_fraction=0.9")) == (
        f"data.train_file={path}: holding out data.eval_fraction=0.9 of 2 records leaves none to train on. Lower it "
        "(data.eval_fraction=0.5 or less keeps at least 1), or give an eval set: data.eval_file=<file> "
        "(may be the train file itself).")
    train, eval_ = load_sft(data_cfg(compose, path, "data.eval_fraction=0.5"), seed=0)
    assert len(train) == len(eval_) == 1


@pytest.mark.parametrize("row, words", [
    ({**PREF, "prompt": 5}, "prompt: expected a non-empty string or a non-empty list of {\"role\": str, \"content\": str} "
                            "messages, got 5 (a JSON number)."),
    ({**PREF, "chosen": 3}, "chosen: expected a non-empty string or a non-empty list of {\"role\": str, \"content\": str} "
                            "messages, got 3 (a JSON number)."),
    ({**PREF, "rejected": {"text": "2 1"}}, "rejected: expected a non-empty string or a non-empty list of {\"role\": str, "
                                           "\"content\": str} messages, got {\"text\": \"2 1\"} (a JSON object)."),
    ({**PREF, "chosen": []}, "chosen: expected a non-empty string or a non-empty list of {\"role\": str, \"content\": str} "
                             "messages, got an empty array."),
], ids=["number_prompt", "number_answer", "object_answer", "empty_list"])
def test_wrong_field_type_names_both_accepted_forms(compose, tmp_path, row, words):
    path = write_jsonl(tmp_path / "train.jsonl", [PREF, row])
    assert load_error(load_preferences, data_cfg(compose, path)) == f"data.train_file={path} line 2: {words}"


def test_messages_field_of_the_wrong_type_accepts_only_a_list(compose, tmp_path):
    chat = {"messages": [{"role": "user", "content": "2 1"}, {"role": "assistant", "content": "1 2"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [chat, {"messages": 7}])
    assert load_error(load_sft, data_cfg(compose, path)) == (
        f"data.train_file={path} line 2: messages: expected a non-empty list of {{\"role\": str, \"content\": str}} "
        "messages, got 7 (a JSON number).")


def test_number_prompt_through_the_cli(tmp_path, local_model):
    path = write_jsonl(tmp_path / "train.jsonl", [PC] * 3 + [{"prompt": 5, "completion": "1 2"}])
    message = cli_error([*JSONL_RUN, f"model.path={local_model}", f"data.train_file={path}"], tmp_path)
    assert message == (f"rlhf_exp: error: data.train_file={path} line 4: prompt: expected a non-empty string or a "
                       "non-empty list of {\"role\": str, \"content\": str} messages, got 5 (a JSON number).")


@pytest.mark.parametrize("args, expected", [
    (["phase=dpo", "phase.beta=null"], "phase.beta: null is not allowed; it needs a number, e.g. phase.beta=0.1."),
    (["phase.max_steps=null"], "phase.max_steps: null is not allowed; it needs an integer, e.g. phase.max_steps=-1."),
    (["hardware.lora=null"], "hardware.lora: null is not allowed; it needs true or false, e.g. hardware.lora=false."),
    (["hardware.precision=null"],
     "hardware.precision: null is not allowed; it needs one of fp32, bf16, fp16, e.g. hardware.precision=fp32."),
    (["model.lora_target_modules=null"],
     "model.lora_target_modules: null is not allowed; it needs a list, e.g. model.lora_target_modules=[all-linear]."),
    (["data.columns=null"], "data.columns: null is not allowed; it is a group of settings. Set its keys instead, "
                            "e.g. data.columns.prompt=prompt, or leave it out for the defaults."),
    (["model.name=null"], "model.name: null is not allowed; it needs a string."),
], ids=["float", "int", "bool", "choice", "list", "group", "no_default"])
def test_null_for_a_non_optional_key_names_type_and_example(tmp_path, args, expected):
    message = cli_error([*args, "dry_run=true"], tmp_path)
    assert message == f"rlhf_exp: error: {expected}"
    assert "Optional" not in message
