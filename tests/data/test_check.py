"""``python -m rlhf_exp.data check``: each bad-data case caught with the row named, agreement measures against
textbook values, simulated annotators whose kappa falls with their quality, and the summary hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_exp.data import agreement as agree
from rlhf_exp.data.check import run_checks, summary

ROOT = Path(__file__).resolve().parents[2]


def data_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlhf_exp.data", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


class WordTokenizer:
    """One token per word, BOS added, EOS known: enough to count lengths without loading a model."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * (len(text.split()) + (1 if add_special_tokens else 0))}


# ----------------------------------------------------------------------------------- agreement


def test_fleiss_kappa_of_the_textbook_example():
    # Fleiss (1971) as Wikipedia works it: 10 items, 14 raters, 5 categories -> P-bar 0.378, P_e 0.213, 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert agree.fleiss_kappa_counts(counts) == pytest.approx(0.210, abs=5e-4)
    labels = [[c for c, n in enumerate(row) for _ in range(n)] for row in counts]  # the same as label lists
    assert agree.fleiss_kappa(labels) == pytest.approx(0.210, abs=5e-4)
    assert agree.percent_agreement(labels) == pytest.approx(0.378, abs=5e-4)


def test_cohen_kappa_of_the_textbook_2x2_example():
    # Wikipedia: 50 items, both yes 20, A yes B no 5, A no B yes 10, both no 15 -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert agree.cohen_kappa(a, b) == pytest.approx(0.4)
    stats = agree.agreement([[x, y] for x, y in zip(a, b)])
    assert (stats["kappa_kind"], stats["percent_agreement"], stats["verdict"]) == ("cohen", pytest.approx(0.7), "moderate")
    # pairwise mean over three annotators; missing labels are skipped; all-agree on one category is undefined
    assert agree.pairwise_cohen_kappa([[x, y, x] for x, y in zip(a, b)]) == pytest.approx((0.4 + 1 + 0.4) / 3)
    assert agree.cohen_kappa(["a", None, "b"], ["a", "b", "b"]) == pytest.approx(1.0)
    assert agree.cohen_kappa(["a", "a"], ["a", "a"]) is None
    assert [agree.verdict(k) for k in (0.2, 0.5, 0.6, None)] == ["poor", "moderate", "good", "undefined"]


# ------------------------------------------------------------------------------ bad-data cases

ROWS = [
    {"prompt": "sort 3 1", "chosen": "1 3", "rejected": "3 1"},                      # line 1: fine
    {"prompt": "sort 2 1", "chosen": "", "rejected": "2 1"},                         # line 2: empty chosen
    {"prompt": "sort 5 4", "chosen": "4 5", "rejected": "4 5"},                      # line 3: identical
    {"prompt": "sort 3 1", "chosen": "1 3", "rejected": "3 1"},                      # line 4: duplicate of 1
    {"prompt": "sort " + "9 " * 20, "chosen": "9 " * 20, "rejected": "8 " * 20},     # line 5: over max_length
    {"prompt": "sort 7 6", "answer": "6 7", "rejected": "7 6"},                      # line 6: no chosen column
    "not json",                                                                      # line 7: unreadable
    {"prompt": "sort 3 1", "chosen": "3 1", "rejected": "1 3"},                      # line 8: contradicts 1
]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def typed(compose, overrides):
    return OmegaConf.to_object(compose(overrides))


@pytest.fixture
def bad_report(compose, tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    cfg = typed(compose, ["data=jsonl", f"data.train_file={path}", "phase=rm", "phase.max_length=16"])
    return run_checks(cfg, WordTokenizer())


@pytest.mark.parametrize("kind,group,row", [
    ("empty", "errors", "line 2: chosen is empty"),
    ("identical", "errors", "line 3: chosen and rejected are identical"),
    ("schema", "errors", "line 6: missing 'chosen'"),
    ("schema", "errors", "line 7: not valid JSON"),
    ("duplicate_pairs", "warnings", "line 4: same pair as line 1"),
    ("contradicting_pairs", "warnings", "line 8: prefers the other answer of line 1"),
    ("over_max_length", "warnings", "line 5: 22 + 21 tokens > 16 (dropped)"),
])
def test_each_bad_case_is_caught_naming_its_row(bad_report, kind, group, row):
    (split,) = bad_report["splits"]
    finding = split[group][kind]
    assert any(r.startswith(row) for r in finding["rows"]), finding
    assert split["rows"] == 8 and bad_report["failed"]


def test_counts_lengths_and_prompts(bad_report):
    (split,) = bad_report["splits"]
    counts = {k: v["count"] for g in ("errors", "warnings") for k, v in split[g].items()}
    assert counts == {"schema": 2, "empty": 1, "identical": 1, "duplicate_pairs": 1, "contradicting_pairs": 1,
                      "over_max_length": 1, "unlabelled": 0}
    assert split["duplicate_prompts"] == {"count": 2, "distinct_prompts": 2}  # lines 1, 4, 8 share a prompt
    assert split["lengths"]["prompt"] == {"min": 4, "median": 4, "p95": 22, "max": 22}  # words + BOS
    firsts = summary(bad_report)["train"]["first_rows"]  # errors first, in the order of the checks
    assert [row.split(":")[0] for row in firsts] == ["line 6", "line 7", "line 2", "line 3", "line 4"]


def test_dpo_rule_and_a_prompt_that_fills_max_length(compose, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "x " * 30, "chosen": "a", "rejected": "b"}])
    cfg = typed(compose, ["data=jsonl", f"data.train_file={path}", "phase=dpo", "phase.max_length=16"])
    (split,) = run_checks(cfg, WordTokenizer())["splits"]
    assert split["warnings"]["over_max_length"]["rows"] == ["line 2: 31 + 2 tokens > 16 (prompt alone fills it: dropped)"]
    assert not split["failed"] and split["warned"]


def test_labels_layout_and_its_errors(compose, tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}", "labels": ["chosen", "chosen"]}
            for i in range(20)]
    rows.append({"prompt": "q", "chosen": "a", "rejected": "b", "labels": ["chosen", "maybe"]})
    rows.append({"prompt": "r", "chosen": "a", "rejected": "b", "labels": ["chosen", "chosen", "tie"]})
    rows.append({"prompt": "s", "chosen": "a", "rejected": "b"})
    path = write_rows(tmp_path / "labelled.jsonl", rows)
    (split,) = run_checks(typed(compose, ["data=jsonl", f"data.train_file={path}"]), None)["splits"]
    schema = split["errors"]["schema"]["rows"]
    assert schema[0].startswith("line 21: labels: 'maybe' is not one of")
    assert schema[1].startswith("line 22: labels: 3 annotators, but earlier rows have 2")
    assert split["warnings"]["unlabelled"]["rows"] == ["line 23: no labels"]
    assert split["agreement"]["percent_agreement"] == 1.0 and split["agreement"]["annotators"] == 2


# --------------------------------------------------------------------------- simulated annotators


def test_one_annotator_leaves_the_data_unchanged_and_more_keep_the_training_label():
    from types import SimpleNamespace

    from rlhf_exp.config.schema import SyntheticTask
    from rlhf_exp.data.synthetic import build_task_data

    def pairs(n):
        syn = SimpleNamespace(**{**vars(SyntheticTask(num_pref_train=300, num_pref_eval=50)), "num_annotators": n})
        return build_task_data(syn, seed=3)["pref_train"]

    one, three = pairs(1), pairs(3)
    assert all(p.labels == () for p in one)
    strip = [(p.prompt, p.chosen, p.rejected, p.gold_chosen, p.gold_rejected) for p in three]
    assert strip == [(p.prompt, p.chosen, p.rejected, p.gold_chosen, p.gold_rejected) for p in one]
    assert all(len(p.labels) == 3 and p.labels[0] == "chosen" for p in three)


def test_cli_kappa_falls_as_annotator_noise_rises():
    kappas = []
    for quality in (0.95, 0.72, 0.55):
        proc = data_cli(["check", "data=synthetic", "data.synthetic.num_annotators=3", "data.synthetic.num_pref_train=800",
                         "data.synthetic.num_pref_eval=50", f"data.synthetic.annotator_agreement={quality}",
                         "--no-tokenizer", "--json", "-"])
        assert proc.returncode == 0, proc.stderr
        train = json.loads(proc.stdout)["splits"][0]
        kappas.append(train["agreement"]["fleiss_kappa"])
        assert train["agreement"]["annotators"] == 3 and train["agreement"]["cohen_kappa"] is not None
    assert kappas[0] > 0.6 > kappas[1] > kappas[2], kappas
    assert kappas[2] < 0.1


def test_cli_text_report_names_rows_and_exit_status(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "report.json"
    proc = data_cli(["check", "data=jsonl", f"data.train_file={path}", "--json", str(out)])
    assert proc.returncode == 1, proc.stderr
    assert "error: empty: 1 rows with an empty prompt, chosen or rejected\n    line 2: chosen is empty" in proc.stdout
    assert "line 3: chosen and rejected are identical" in proc.stdout and "data check FAILED" in proc.stdout
    assert json.loads(out.read_text())["failed"] is True
    clean = write_rows(tmp_path / "clean.jsonl", [ROWS[0]])
    proc = data_cli(["check", "data=jsonl", f"data.train_file={clean}", "--no-tokenizer", "--strict"])
    assert proc.returncode == 0 and "data check passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("args,message", [
    (["check", "--limit", "0"], "--limit 0: must be a positive number of rows"),
    (["check", "phase=sft"], "phase=sft: data check reads preference pairs"),
    (["check", "data=jsonl", "data.train_file=/no/such.jsonl"], "no such file"),
    (["check", "--bogus"], "unrecognized arguments: --bogus"),
    (["check", "data=synthetic", "data.synthetic.num_annotators=0"], "data.synthetic.num_annotators=0: must be in"),
])
def test_cli_bad_arguments_fail_in_one_line(args, message):
    proc = data_cli(args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------- runs' summary


def test_runs_record_the_checks_in_their_summary(compose, tmp_path):
    from rlhf_exp.data.check import report_run
    from rlhf_exp.models import build_tiny_tokenizer
    from rlhf_exp.tracking.run import Run

    overrides = ["phase=rm", "data.synthetic.num_annotators=2", "data.synthetic.num_pref_train=200",
                 "data.synthetic.num_pref_eval=40"]
    cfg = compose(overrides)
    with Run(tmp_path / "run", cfg) as run:
        report_run(OmegaConf.to_object(cfg), run, build_tiny_tokenizer())
        run.finish({}, None)
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    check = data["train"]["check"]
    assert check["rows"] == 200 and check["schema"] == 0 and check["over_max_length"] == 0
    assert check["agreement"]["annotators"] == 2 and check["agreement"]["cohen_kappa"] is not None
    assert data["eval"]["check"]["rows"] == 40


@pytest.mark.parametrize("family", ["llama3_1", "mistral_v03", "qwen2_5"])
def test_chat_rows_are_measured_in_the_templates_tokens(scaled_model, compose, tmp_path, family):
    """Chat-format pairs on a real chat template (scaled-down models, real templates): lengths are the trainers' ids
    (prompt with the generation prompt; each answer with its end of turn), checked here against the rendered
    template tokenized as text, and the over-length pair is named with those counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scaled_model(family))

    def user(text):
        return [{"role": "user", "content": text}]

    def said(text):
        return [{"role": "assistant", "content": text}]

    rows = [{"prompt": user("Sort these digits: 3 1 2"), "chosen": said("1 2 3"), "rejected": said("3 2 1")},
            {"prompt": user("Sort these digits: 5 4"), "chosen": said("4 5 " * 20), "rejected": said("5 4")}]

    def rendered(messages, **kw) -> int:  # the template as text, then tokenized: another path to the same ids
        return len(tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"])

    expected = []
    for row in rows:
        p = rendered(row["prompt"], add_generation_prompt=True)
        expected.append((p, rendered(row["prompt"] + row["chosen"]) - p, rendered(row["prompt"] + row["rejected"]) - p))
    assert expected[0][0] > 10  # the template's header tokens count, not the 2 keys of a BatchEncoding
    limit = max(sum(expected[0][:2]), sum(expected[0][::2]), sum(expected[1][::2])) + 1
    assert sum(expected[1][:2]) > limit
    path = write_rows(tmp_path / "chat.jsonl", rows)
    cfg = typed(compose, ["data=jsonl", f"data.train_file={path}", "phase=rm", f"phase.max_length={limit}"])
    (split,) = run_checks(cfg, tok)["splits"]
    lengths = split["lengths"]
    assert lengths["prompt"]["max"] == max(e[0] for e in expected) and lengths["prompt"]["min"] == min(e[0] for e in expected)
    assert lengths["chosen"]["max"] == expected[1][1] and lengths["rejected"]["min"] == min(e[2] for e in expected)
    over = split["warnings"]["over_max_length"]
    assert over["count"] == 1 and over["rows"][0].startswith(f"line 2: {expected[1][0]} + {expected[1][1]} tokens"), over


# ------------------------------------------------------------------------------------- reused reports


@pytest.fixture
def kept(monkeypatch, tmp_path):
    """Reports kept under a folder of this test's own (datasets' cache setting, which decides where), and a count of
    the splits actually checked."""
    import datasets

    from rlhf_exp.data import check

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    checked = []
    real = check.check_section

    def counting(section, *args, **kwargs):
        checked.append(section.where)
        return real(section, *args, **kwargs)

    monkeypatch.setattr(check, "check_section", counting)
    return checked


def test_a_report_is_reused_until_the_rows_the_settings_the_tokenizer_or_the_code_change(
        scaled_model, compose, tmp_path, kept, monkeypatch):
    """A sweep job or a rerun on the same pairs reads the earlier report back instead of tokenising every row again
    (the same report, as the run's summary records it); any change to what the report depends on checks again."""
    import copy

    from transformers import AutoTokenizer

    from rlhf_exp.data import check

    tok = AutoTokenizer.from_pretrained(scaled_model("llama3_1"))

    def pair(i, chosen="yes", rejected="no"):
        return {"prompt": [{"role": "user", "content": f"question {i}"}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    rows = [pair(i) for i in range(30)] + [pair(3)]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    args = ["data=jsonl", f"data.train_file={path}", "phase=dpo"]
    cfg = typed(compose, [*args, "phase.max_length=64"])

    first, reused = check.reused_checks(cfg, tok)
    assert not reused and len(kept) == 1
    assert first["splits"][0]["warnings"]["duplicate_pairs"]["count"] == 1
    again, reused = check.reused_checks(cfg, tok)
    assert reused and len(kept) == 1, "the same rows, settings and tokenizer were checked again"
    assert again == json.loads(json.dumps(first)) and summary(again) == summary(first)
    (kept_file,) = (tmp_path / "hf_datasets" / "rlhf_exp_data_check").glob("*.json")

    # another max_length, another chat template, another checking code: checked again, each once
    shorter = typed(compose, [*args, "phase.max_length=12"])
    report, reused = check.reused_checks(shorter, tok)
    assert not reused and len(kept) == 2 and report["splits"][0]["warnings"]["over_max_length"]["count"] == 31
    assert check.reused_checks(shorter, tok)[1] and len(kept) == 2
    other_template = copy.deepcopy(tok)
    other_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not check.reused_checks(cfg, other_template)[1] and len(kept) == 3
    with monkeypatch.context() as m:
        m.setattr(check, "_code_digest", lambda: "another version of the checks")
        assert not check.reused_checks(cfg, tok)[1] and len(kept) == 4
    with monkeypatch.context() as m:
        m.setattr(check, "report_key", lambda *a: 1 / 0)  # no key can be made: checked, never kept or failing
        assert not check.reused_checks(cfg, tok)[1] and len(kept) == 5
    kept.pop()

    # another data setting (the format named instead of detected): checked again
    assert not check.reused_checks(typed(compose, [*args, "phase.max_length=64", "data.format=preference"]),
                                   tok)[1]
    kept.pop()
    # the file changed (a pair with no preference appended): checked again, and the new report says so
    write_rows(path, [*rows, pair(99, "same", "same")])
    report, reused = check.reused_checks(cfg, tok)
    assert not reused and len(kept) == 5
    assert report["splits"][0]["rows"] == 32 and report["splits"][0]["errors"]["identical"]["count"] == 1

    # a kept file that cannot be read back (written by hand, a full disk) is checked again and replaced
    current = check.reports_folder() / f"{check.report_key(cfg, tok, check.sections(cfg.data))}.json"
    assert current.is_file() and current != kept_file
    current.write_text('{"key": ')
    assert not check.reused_checks(cfg, tok)[1] and len(kept) == 6
    report, reused = check.reused_checks(cfg, tok)
    assert reused and report["splits"][0]["errors"]["identical"]["count"] == 1 and len(kept) == 6


def test_a_report_that_cannot_be_kept_is_still_given(compose, tmp_path, kept, monkeypatch):
    """No writable cache (a read-only home on a cluster): every run checks, none fails for it."""
    import datasets

    from rlhf_exp.data import check

    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(blocked))
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    cfg = typed(compose, ["data=jsonl", f"data.train_file={path}", "phase=rm", "phase.max_length=16"])
    for _ in range(2):
        report, reused = check.reused_checks(cfg, WordTokenizer())  # no backend spec: never kept
        assert not reused and report["failed"]
    for _ in range(2):
        report, reused = check.reused_checks(cfg, None)  # characters: kept, but the folder cannot be made
        assert not reused and report["length_unit"] == "characters"
    assert len(kept) == 4


def test_the_embedded_tasks_report_is_kept_under_its_pairs(compose, kept):
    """The embedded task is built in memory: its report is keyed by the pairs themselves, so another data.seed (other
    pairs) is checked again, and the same settings read it back."""
    from rlhf_exp.data import check
    from rlhf_exp.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    synthetic = typed(compose, ["phase=rm"])
    first, reused = check.reused_checks(synthetic, tok)
    assert not reused and len(kept) == 2
    again, reused = check.reused_checks(synthetic, tok)
    assert reused and len(kept) == 2 and summary(again) == summary(first)
    assert not check.reused_checks(typed(compose, ["phase=rm", "data.seed=1"]), tok)[1] and len(kept) == 4


def test_runs_time_their_data_check(compose, tmp_path):
    from rlhf_exp.data.check import report_run
    from rlhf_exp.models import build_tiny_tokenizer
    from rlhf_exp.tracking.run import Run

    cfg = compose(["phase=dpo"])
    with Run(tmp_path / "run", cfg) as run:
        report_run(OmegaConf.to_object(cfg), run, build_tiny_tokenizer())
        run.finish({}, None)
    timings = json.loads((tmp_path / "run" / "summary.json").read_text())["timings"]
    assert timings["data_check"]["cpu_s"] > 0 and timings["other"]["cpu_s"] >= 0
