"""Resumable checkpoints: when they are written, which ones are complete, which to resume from.

Every phase writes ``checkpoints/trainer/checkpoint-<step>/`` (weights, optimizer, scheduler, RNG
states, data position; PPO adds its KL controller and sampling state) every ``phase.save_steps``
steps, every ``phase.save_minutes`` minutes, and when a stop signal arrives (``launch.signals``).
A checkpoint counts only once :func:`mark_complete` has written its ``complete.json`` (the size of
every file, written last and atomically): a run killed in the middle of a save leaves a checkpoint
without it, and a file truncated later no longer matches its size. Both are skipped with a warning in
favour of the previous checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback

from rlhf_exp.launch.signals import GUARD, Interrupted
from rlhf_exp.tracking.run import is_main_process, write_json_atomic

MARKER = "complete.json"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def mark_complete(folder: Path, step: int, **extra) -> None:
    """Record ``folder`` as a complete checkpoint of ``step`` (main process; call after every file)."""
    if is_main_process() and folder.is_dir():
        write_json_atomic(folder / MARKER, {"step": step, **extra, "files": _files(folder)})


class Checkpointing(TrainerCallback):
    """For the TRL trainers: time-based saves, saves asked for by a stop signal, the completion marker,
    and the loss-logging window. transformers' resume starts a fresh window (train/loss averages only
    the steps since the resume, and the run's mean loss only those) and so would log other numbers
    than an uninterrupted run whenever a checkpoint falls between two logs; each checkpoint therefore
    carries the window (``loss_window_<rank>.json``) and a resumed run starts from it. With
    ``resumable`` false (no save_steps/save_minutes) a stop signal stops without saving."""

    def __init__(self, save_minutes: float | None, resumable: bool):
        self.save_minutes, self.resumable = save_minutes, resumable
        self.stopping = False
        self.trainer = None  # set by the runner once the trainer exists
        self.resume_from: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        GUARD.begin_training()
        window = self.resume_from / f"loss_window_{_rank()}.json" if self.resume_from else None
        if window is not None and window.is_file() and _has_window(self.trainer):
            import torch

            saved = json.loads(window.read_text())
            self.trainer._tr_loss = torch.tensor(saved["tr_loss"], device=args.device)
            self.trainer._total_loss_scalar = saved["total_loss_scalar"]
            self.trainer._globalstep_last_logged = saved["last_logged"]
            self.trainer._initial_global_step = 0  # the run's mean loss counts every step

    def on_train_end(self, args, state, control, **kwargs):
        GUARD.end_training()

    def on_step_end(self, args, state, control, **kwargs):
        save, stop = GUARD.poll(self.save_minutes)
        if stop and not self.resumable:
            raise Interrupted(GUARD.signum, state.global_step, None)
        if save:
            control.should_save = True
        self.stopping = stop

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.write_window(folder)
        mark_complete(folder, state.global_step)
        GUARD.saved()
        if self.stopping:  # raised out of trainer.train(): nothing after the loop runs
            raise Interrupted(GUARD.signum, state.global_step, str(folder))


    def write_window(self, folder: Path) -> None:
        """This rank's loss-logging window into ``folder``; returns once every rank has written its own."""
        if self.trainer is None:
            return
        t = self.trainer
        if _has_window(t):
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"loss_window_{_rank()}.json",
                              {"tr_loss": float(t._tr_loss), "total_loss_scalar": t._total_loss_scalar,
                               "last_logged": t._globalstep_last_logged})
        t.accelerator.wait_for_everyone()  # every rank's files are written before the marker lists them


def _has_window(trainer) -> bool:
    """transformers' private loss-window attributes (5.2x); without them resume just starts a new window."""
    return trainer is not None and all(hasattr(trainer, a) for a in ("_tr_loss", "_total_loss_scalar",
                                                                     "_globalstep_last_logged"))


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no complete.json: the save did not finish"
    expected = json.loads(marker.read_text())["files"]
    actual = _files(folder)
    for name, size in expected.items():
        if actual.get(name) != size:
            return f"{name} is {actual.get(name, 'missing')} bytes, {size} were written"
    return None


def step_of(folder: Path) -> int:
    """The step a ``checkpoint-<step>`` folder holds."""
    return int(folder.name.rsplit("-", 1)[1])


def of_trainer(trainer) -> Checkpointing | None:
    """The :class:`Checkpointing` callback among a TRL trainer's callbacks."""
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, Checkpointing)), None)


def checkpoints(trainer_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under ``trainer_dir``, newest first."""
    found = [(int(m.group(1)), p) for p in trainer_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found, reverse=True)


def latest_complete(trainer_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``trainer_dir``; incomplete ones are skipped with a warning."""
    for _, folder in checkpoints(trainer_dir):
        why = problem(folder)
        if why is None:
            return folder
        print(f"rlhf_exp: warning: skipping checkpoint {folder} ({why}); trying the one before", file=sys.stderr)
    return None


def metric_of(folder: Path) -> float | None:
    marker = folder / MARKER
    return json.loads(marker.read_text()).get("metric") if marker.is_file() else None


def prune(trainer_dir: Path, keep: int, greater_is_better: bool = True) -> None:
    """Keep the newest ``keep`` complete checkpoints plus the best one by the metric recorded in their
    marker; delete the rest (incomplete ones too, unless newer than every complete one: a save may be
    under way). Main process only."""
    if not is_main_process():
        return
    found = checkpoints(trainer_dir)
    complete = [p for _, p in found if problem(p) is None]
    kept = set(complete[:keep])
    best = best_checkpoint(complete, greater_is_better)
    if best is not None:
        kept.add(best)
    newest = step_of(complete[0]) if complete else None
    for step, folder in found:
        if folder in kept or (newest is not None and step > newest):
            continue
        shutil.rmtree(folder, ignore_errors=True)
    for partial in trainer_dir.glob(".checkpoint-*.partial"):  # left by a save that was killed
        shutil.rmtree(partial, ignore_errors=True)


def keep_alarm_checkpoint(folder: Path, alarms_dir: Path) -> Path:
    """A copy of the complete checkpoint ``folder`` as ``alarms_dir/<its name>`` (monitor.on_alarm=checkpoint), made
    of hard links where the filesystem allows (no second copy of the bytes; checkpoint files are never rewritten),
    so that pruning and the end-of-run cleanup of ``checkpoints/trainer/`` leave it in place. Main process only;
    returns the copy's path on every process."""
    import os

    dest = alarms_dir / folder.name
    if not is_main_process():
        return dest

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or no hard links: a real copy
            shutil.copy2(src, dst)

    alarms_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest, copy_function=link)
    return dest


def best_checkpoint(folders: list[Path], greater_is_better: bool = True) -> Path | None:
    scored = [(m, f) for f in folders if (m := metric_of(f)) is not None]
    if not scored:
        return None
    return (max if greater_is_better else min)(scored, key=lambda mf: mf[0])[1]


def best_unless_final(trainer_dir: Path, final_step: int, greater_is_better: bool = True) -> Path | None:
    """The best complete checkpoint by its recorded metric; None when that is the final step's (the
    final model is then the best one) or when none recorded a metric."""
    best = best_checkpoint([p for _, p in checkpoints(trainer_dir) if problem(p) is None], greater_is_better)
    return None if best is None or best.name == f"checkpoint-{final_step}" else best
