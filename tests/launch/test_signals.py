"""The stop guard: a signal is recorded (not acted on mid-step), polled at step ends, and handed back
to the handler that was there before (submitit's, under SLURM) after the run recorded its checkpoint."""

from __future__ import annotations

import os
import signal

import pytest

from rlhf_exp.launch.signals import Interrupted, StopGuard


def test_a_signal_is_recorded_and_handed_back_to_the_previous_handler(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        guard = StopGuard()
        guard.install()
        assert guard.poll(save_minutes=None) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.poll(save_minutes=None) == (True, True) and calls == []  # recorded, nothing else yet
        guard.uninstall()  # the run's finally: the signals go back before the entrypoint hands over
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        exits = []
        monkeypatch.setattr(os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit(code)))
        with pytest.raises(SystemExit):
            guard.hand_over(Interrupted(signal.SIGUSR2, 4, "ckpt"), rank=0, run_dir="run")
        assert calls == [signal.SIGUSR2], "submitit's handler (checkpoint + requeue) was called"
        assert exits == [128 + signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_time_based_saves_are_due_after_save_minutes():
    guard = StopGuard()
    assert guard.poll(save_minutes=0.5) == (False, False) and guard.poll(save_minutes=None) == (False, False)
    guard._last_save -= 60
    assert guard.poll(save_minutes=0.5) == (True, False)
    guard.saved()
    assert guard.poll(save_minutes=0.5) == (False, False)


def test_without_submitit_the_run_exits_with_128_plus_the_signal(capsys):
    guard = StopGuard()
    with pytest.raises(SystemExit) as exit_info:
        guard.hand_over(Interrupted(signal.SIGTERM, 7, "ckpt"), rank=0, run_dir="/runs/x")
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "resume=/runs/x" in capsys.readouterr().err
