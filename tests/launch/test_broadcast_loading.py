"""Under FSDP on several processes only rank 0 reads a checkpoint (``models.broadcast_loading``): the other
processes build the model's skeleton on the meta device and receive rank 0's weights when FSDP shards it. Checked
on 2 CPU processes (gloo) for the scaled-down real architectures and the embedded model (tied embeddings): the
other rank held nothing after loading, and the sharded model computes what the checkpoint loaded whole computes,
through PPO's FSDP backend's path (``load_from_rank0``) and through accelerate's FSDP2 preparation (the TRL phases'
path on GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run_workers(folder, tmp_path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "launch" / "broadcast_worker.py"), str(folder), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _embedded(tmp_path):
    from rlhf_exp.config.schema import ModelConfig
    from rlhf_exp.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(ModelConfig(), tokenizer)
    assert model.config.tie_word_embeddings  # the case that needs re-tying in the skeleton
    folder = tmp_path / "embedded"
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family", ["embedded", "llama3_1", "qwen2_5"])
def test_only_rank_0_reads_and_the_shards_hold_its_weights(family, scaled_model, tmp_path):
    folder = _embedded(tmp_path) if family == "embedded" else scaled_model(family)
    ranks = _run_workers(folder, tmp_path)
    for name in ("causal_lm", "classifier", "accelerate"):
        first, other = ranks[0][name], ranks[1][name]
        assert first["held_after_loading"] == first["total"] and other["held_after_loading"] == 0, (name, ranks)
        for r in ranks:
            # the same numbers as the whole model (float summation order aside): every shard came from rank 0
            assert r[name]["max_abs_diff"] < 1e-5, (name, ranks)
            assert r[name]["rotary_inv_freq_finite"], (name, ranks)
            if r[name]["tied_still_one"] is not None:
                assert r[name]["tied_still_one"], (name, ranks)
            if name != "accelerate":  # every process gathers the whole weights a rollout engine loads (vllm)
                assert r[name]["whole_parameters_equal"], (name, ranks)
