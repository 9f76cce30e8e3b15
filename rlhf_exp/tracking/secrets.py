"""Secrets (hub and W&B tokens) never reach a file, a log line or W&B.

rlhf_exp's config has no secret fields: tokens are read by the libraries from the environment
(HF_TOKEN, WANDB_API_KEY, ...). A secret can still slip into what a run records when a config value
interpolates it (``${oc.env:HF_TOKEN}``) or a command line carries it; :func:`scrub` replaces the value
of every secret-looking environment variable by ``***`` in what rlhf_exp writes: config.yaml, the
manifest (command, error), Hydra's copies under .hydra/, W&B's config, and error messages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ..._PASSWORD
SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY)", re.I)
MASK = "***"


def secret_values() -> list[str]:
    """Values of secret-looking environment variables, longest first (short values are not masked:
    masking '1' or 'true' would garble everything)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def scrub(obj: Any, values: list[str] | None = None) -> Any:
    """``obj`` (a string, or dicts/lists of them) with every secret value replaced by ``***``."""
    values = secret_values() if values is None else values
    if not values:
        return obj
    if isinstance(obj, str):
        for value in values:
            obj = obj.replace(value, MASK)
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, values) for v in obj)
    return obj


def scrub_files(folder: Path, pattern: str = "*.yaml") -> None:
    """Rewrite files (Hydra's .hydra/ copies) that contain a secret value."""
    values = secret_values()
    if not values or not folder.is_dir():
        return
    for path in folder.glob(pattern):
        text = path.read_text()
        clean = scrub(text, values)
        if clean != text:
            path.write_text(clean)
