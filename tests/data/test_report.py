"""Records cut or dropped for length are counted by each trainer's rule, reported in summary.json and
said once; the preview shows what the trainer feeds."""

from __future__ import annotations

import datasets

from rlhf_exp.data.report import length_counts, preview


def test_length_counts_follow_each_trainers_rule():
    sft = datasets.Dataset.from_list([{"input_ids": [1] * 8}, {"input_ids": [1] * 5}])  # one cut at 8
    assert length_counts("sft", 3, sft, max_length=8) == {"of": 3, "dropped": 1, "truncated": 1}
    rm = datasets.Dataset.from_list([{"chosen_ids": [1] * 4, "rejected_ids": [1] * 6}])  # TRL dropped the other 2
    assert length_counts("rm", 3, rm, max_length=8) == {"of": 3, "dropped": 2, "truncated": 0}
    dpo = datasets.Dataset.from_list([{"prompt_ids": [1] * 5, "chosen_ids": [1] * 2, "rejected_ids": [1] * 4},
                                      {"prompt_ids": [1] * 2, "chosen_ids": [1] * 2, "rejected_ids": [1] * 2}])
    assert length_counts("dpo", 2, dpo, max_length=8) == {"of": 2, "dropped": 0, "truncated": 1}


def test_counted_in_the_summary_and_warned_once(compose, tmp_path, capsys):
    from rlhf_exp.tracking.run import Run

    cfg = compose([])
    with Run(tmp_path / "run", cfg) as run:
        run.record_data("train", loaded=10, kept=9, dropped={"identical_pair": 1})
        run.count_length("train", total=9, dropped=2, truncated=3, rule="RM drops pairs longer than 8 tokens")
        run.finish({}, None)
    err = capsys.readouterr().err
    assert err.count("warning: train: 2 dropped and 3 truncated of 9 records for length (RM drops pairs longer") == 1
    import json

    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data["train"] == {"loaded": 10, "kept": 9, "dropped": {"identical_pair": 1},
                             "length_limit": {"rule": "RM drops pairs longer than 8 tokens", "of": 9, "dropped": 2,
                                              "truncated": 3}}


def test_preview_decodes_every_ids_column_with_special_tokens():
    from rlhf_exp.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok("3 1 = 1 3<eos>")["input_ids"]
    rows = preview(datasets.Dataset.from_list([{"chosen_ids": ids, "rejected_ids": ids[:3], "margin": 1.0}]), tok)
    assert rows == [{"record": 0, "chosen_ids": {"text": "<bos> 3 1 = 1 3 <eos>", "tokens": 7},
                     "rejected_ids": {"text": "<bos> 3 1", "tokens": 3}}]


def test_packed_sft_counts_the_records_inside_the_bins():
    packed = datasets.Dataset.from_list([{"input_ids": [1] * 8, "seq_lengths": [3, 5]},
                                         {"input_ids": [1] * 8, "seq_lengths": [8]}])
    assert length_counts("sft", 3, packed, max_length=8) == {"of": 3, "dropped": 0, "truncated": 1}
