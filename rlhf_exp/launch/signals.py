"""Stop requests: save a resumable checkpoint, then stop (and, under SLURM, requeue).

SLURM warns a job before it kills it: ``SIGUSR2`` ``launcher.signal_delay_s`` seconds before the time
limit (or on preemption, with submitit's ``--signal``), ``SIGTERM`` on ``scontrol requeue``,
preemption or ``scancel``. A signal handler cannot save a model safely in the middle of a step, so
the handler only records the request; the training loops ask :func:`poll` once per step, save a
complete checkpoint at that step boundary, and raise :class:`Interrupted`. The entrypoint then hands
over to what launched the run:

- under submitit, ``SIGUSR2`` goes on to submitit's own handler, which resubmits the same Hydra job
  (same run folder) and requeues it with ``scontrol requeue``; the requeued job finds the folder's
  manifest and continues from the checkpoint (``resume=auto``);
- under submitit, ``SIGTERM`` means SLURM is already requeueing or cancelling the job: the process
  exits without a result, so submitit waits for the requeued job;
- anywhere else the run stops with exit status 128+signal and says how to continue it.

``poll`` also decides time-based saves (``phase.save_minutes``). With several processes the decision
is all-reduced, so every rank saves and stops at the same step even when the signal reached them at
different times.

This module imports no ML library at import time.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Interrupted(Exception):
    """A stop request was honoured: a resumable checkpoint of ``step`` is in ``checkpoint``. ``step``
    None: the signal came outside the training steps (loading, final evaluation or save), where there
    is no step boundary to save at; a resumed run continues from the latest complete checkpoint."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if step is None:
            message = f"{name} received outside the training steps; stopped (resuming continues from the latest " \
                      "complete checkpoint)"
        else:
            where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (resumable checkpoints are off)"
            message = f"{name} received; stopped after step {step} with {where}"
        super().__init__(message)


class StopGuard:
    """Records stop signals for the training loops (one per process; installed around a run)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received: float | None = None  # time.time() when the signal arrived
        self._previous: dict[int, object] = {}
        self._handed_back: dict[int, object] = {}
        self._last_save = time.monotonic()
        self.in_training = False

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals are only delivered to the main thread's handlers
        self.signum = None
        self.received = None
        self.in_training = False
        self._last_save = time.monotonic()
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers (kept for :meth:`hand_over`)."""
        if not self._previous:
            return  # not installed, or already given back (execute's finally, then hand_over)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._handed_back = dict(self._previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        self.received = time.time()
        if not self.in_training:  # no step end will come to save at: stop now
            raise Interrupted(signum, None, None)
        # os.write, not print: a print interrupted inside another stderr write raises "reentrant call"
        os.write(2, f"rlhf_exp: {signal.Signals(signum).name} received: saving a checkpoint at the end of this "
                    "step, then stopping\n".encode())

    def begin_training(self) -> None:
        """From here to :meth:`end_training` the loops poll at every step end."""
        self.in_training = True

    def end_training(self) -> None:
        """The loop is done; a signal it did not act on stops the run now."""
        self.in_training = False
        if self.signum is not None:
            raise Interrupted(self.signum, None, None)

    def saved(self) -> None:
        """A checkpoint was just written: the next time-based save is due ``save_minutes`` from now."""
        self._last_save = time.monotonic()

    def poll(self, save_minutes: float | None) -> tuple[bool, bool]:
        """(save now, stop now) for the step that just ended, agreed by every process."""
        stop = self.signum is not None
        due = save_minutes is not None and time.monotonic() - self._last_save >= save_minutes * 60
        if _world() > 1:
            stop, due, signum = _agree(stop, due, self.signum or 0)
            if stop and self.signum is None:  # another rank got the signal first
                self.signum, self.received = signum, time.time()
        return stop or due, stop

    def hand_over(self, exc: Interrupted, rank: int, run_dir) -> None:
        """After the run folder recorded the interruption: requeue (submitit) or exit. Never returns."""
        self.uninstall()
        previous = self._handed_back.get(exc.signum)
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            sys.stderr.flush()
            if rank != 0:
                # exit 0: a non-zero exit would make srun (SLURM_KILL_BAD_EXIT=1) kill rank 0 before it requeues
                os._exit(0)
            if exc.signum == signal.SIGUSR2 and callable(previous):
                # submitit's handler: checkpoint() resubmits this Hydra job, `scontrol requeue`, then exit
                previous(exc.signum, None)
            os._exit(128 + exc.signum)  # no result: submitit waits for the requeued job
        if rank == 0:
            print(f"rlhf_exp: {exc}. Continue it with: python -m rlhf_exp resume={run_dir}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _agree(stop: bool, due: bool, signum: int) -> tuple[bool, bool, int]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return stop, due, signum
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([int(stop), int(due), signum], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1]), int(flags[2])


GUARD = StopGuard()
