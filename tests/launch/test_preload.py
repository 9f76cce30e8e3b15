"""The pipeline's pre-imported phase server (rlhf_exp.launch.preload): phases forked from one process that imported
the ML libraries once, each still its own process with its own exit status and signals."""

from __future__ import annotations

import os
import signal
import time

import pytest
from omegaconf import OmegaConf

from rlhf_exp.launch.preload import PhaseServer
from rlhf_exp.pipeline import _phase_server


@pytest.fixture
def server():
    s = PhaseServer(env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield s
    s.close()


def test_phases_run_as_their_own_processes_with_their_exit_status(capfd):
    server = PhaseServer(env={**os.environ, "OMP_NUM_THREADS": "1"})  # started here: it inherits capfd's streams
    try:
        assert server.ready(), server.why_not
        ok = server.start(["--cfg", "job", "phase=dpo", "phase.beta=0.25"])
        assert ok.pid != server.proc.pid and ok.wait() == 0
        assert "beta: 0.25" in capfd.readouterr().out  # the phase's output is the pipeline's
        bad = server.start(["phase=dpo", "phase.betta=0.1", "dry_run=true"])
        assert bad.wait() == 2  # the CLI's refusal status, as from a fresh process
        assert "phase.betta" in capfd.readouterr().err
    finally:
        server.close()


def test_a_signal_reaches_the_phase_and_the_server_goes_on(server, tmp_path):
    assert server.ready()
    # a phase that waits for its first step long enough to be signalled: SFT with a huge save interval
    phase = server.start(["phase.max_steps=100000", "phase.save_minutes=null", f"output_root={tmp_path}"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("runs/*/metrics.jsonl")) and time.monotonic() < deadline and phase.poll() is None:
        time.sleep(0.2)
    assert phase.poll() is None  # still training
    phase.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    while phase.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert phase.returncode not in (None, 0)  # stopped by the signal (no checkpoints: a stop without saving)
    assert server.start(["--cfg", "job"]).wait() == 0  # the next phase starts as usual


def test_no_server_where_forking_does_not_fit(compose, monkeypatch, tmp_path):
    cfg = compose(["pipeline=rlhf", f"output_root={tmp_path}"])
    assert OmegaConf.select(cfg, "pipeline.preload") is True
    off = compose(["pipeline=rlhf", "pipeline.preload=false", f"output_root={tmp_path}"])
    assert _phase_server(off, tmp_path / "p", in_job=False, composed={}) is None
    gpu = compose(["pipeline=rlhf", "hardware=a100x1", f"output_root={tmp_path}"])
    assert _phase_server(gpu, tmp_path / "p", in_job=False, composed={}) is None  # CUDA must not be touched before a fork
    monkeypatch.setenv("RLHF_EXP_THREADS", "torch")  # torch's default threads are fixed at its import
    assert _phase_server(cfg, tmp_path / "p", in_job=False, composed={}) is None


def test_the_server_builds_the_embedded_task_once_for_the_phases(compose):
    """The pipeline sends each phase's synthetic_key (through JSON, on the server's command line); warm_synthetic
    builds the examples into the server's cache, so a phase forked from it finds them there instead of building them."""
    import json

    from rlhf_exp.data import loading

    plain = OmegaConf.to_object(compose(["phase=ppo", "data.synthetic.num_pref_train=300"]))  # as a phase holds it
    chat = compose(["phase=dpo", "data=synthetic_chat", "data.synthetic.num_pref_train=300"])  # as the pipeline does
    key = loading.synthetic_key(chat.data)
    assert key == loading.synthetic_key(plain.data)  # both forms: the same examples, one build
    assert loading.synthetic_key(compose(["data=jsonl", "data.path=x"]).data) is None
    loading._synthetic.cache_clear()
    loading.warm_synthetic(json.loads(json.dumps([key])))
    built = loading._synthetic.cache_info()
    splits = loading.synthetic_splits(plain.data)
    assert loading._synthetic.cache_info().hits == built.hits + 1 and loading._synthetic.cache_info().misses == 1
    assert len(splits["pref_train"]) == 300
