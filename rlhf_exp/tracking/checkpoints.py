"""Resumable checkpoints: which ones are complete, and which to resume from.

The trainers write ``checkpoints/trainer/checkpoint-<step>/`` (weights, optimizer, scheduler, RNG
states, trainer state). A checkpoint counts only once :class:`MarkComplete` has written its
``complete.json`` (the size of every file, written last and atomically): a run killed in the middle of
a save leaves a checkpoint without it, and a file truncated later no longer matches its size. Both are
skipped with a warning in favour of the previous checkpoint.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from transformers import TrainerCallback

from rlhf_exp.tracking.run import is_main_process, write_json_atomic

MARKER = "complete.json"


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


class MarkComplete(TrainerCallback):
    """After the trainer has saved a checkpoint, record it as complete."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and folder.is_dir():
            write_json_atomic(folder / MARKER, {"step": state.global_step, "files": _files(folder)})


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


def latest_complete(trainer_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``trainer_dir``; incomplete ones are skipped with a warning."""
    found = [(int(m.group(1)), p) for p in trainer_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, folder in sorted(found, reverse=True):
        why = problem(folder)
        if why is None:
            return folder
        print(f"rlhf_exp: warning: skipping checkpoint {folder} ({why}); trying the one before", file=sys.stderr)
    return None
