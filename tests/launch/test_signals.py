"""The stop guard: a signal is recorded (not acted on mid-step), polled at step ends, and handed back
to the handler that was there before (submitit's, under SLURM) after the run recorded its checkpoint."""

from __future__ import annotations

import os
import signal

import pytest

from rlhf_exp.launch.signals import Interrupted, StopGuard


def submitit_like(calls):
    """Like submitit's checkpoint_and_try_requeue: it requeues, then exits (SystemExit(-1))."""
    def handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)
    return handler


def test_a_signal_is_recorded_and_handed_back_to_the_previous_handler(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, submitit_like(calls))
    try:
        guard = StopGuard()
        guard.install()
        guard.begin_training()
        assert guard.poll(save_minutes=None) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.poll(save_minutes=None) == (True, True) and calls == []  # recorded, nothing else yet
        guard.uninstall()  # the run's finally: the signals go back before the entrypoint hands over
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        exits = []
        monkeypatch.setattr(os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(SystemExit(code)))
        with pytest.raises(SystemExit) as exit_info:
            guard.hand_over(Interrupted(signal.SIGUSR2, 4, "ckpt"), rank=0, run_dir="run")
        assert calls == [signal.SIGUSR2], "submitit's handler (checkpoint + requeue) was called"
        assert exit_info.value.code == -1 and exits == []
        # another rank of the job: exits 0 at once (non-zero would make srun kill rank 0 before it requeues)
        with pytest.raises(SystemExit):
            guard.hand_over(Interrupted(signal.SIGUSR2, 4, "ckpt"), rank=1, run_dir="run")
        assert exits == [0] and calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_signal_outside_the_training_steps_stops_at_once():
    guard = StopGuard()
    guard.install()
    try:
        with pytest.raises(Interrupted, match="SIGTERM received outside the training steps"):
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the models load
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        guard.install()
        guard.begin_training()
        os.kill(os.getpid(), signal.SIGUSR2)  # during the last step, after its poll
        with pytest.raises(Interrupted, match="SIGUSR2 received outside the training steps"):
            guard.end_training()
    finally:
        guard.uninstall()


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
