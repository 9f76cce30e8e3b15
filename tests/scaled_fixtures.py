"""Scaled-down real models (``rlhf_exp.scaled_models``) for tests, built once per session.

``scaled_model(family, **overrides) -> Path`` builds a family's folder the first time a session asks
for those arguments and returns the same folder afterwards, so every test that wants "a real
Llama 3.1" pays for one build. The folders are shared: read them, do not change them (copy one with
``shutil.copytree`` first). To make the fixture available everywhere, tests/conftest.py needs

    from tests.scaled_fixtures import scaled_model  # noqa: F401

The plain functions work without pytest (e.g. from a benchmark script).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest


def folder_name(family: str, overrides: dict) -> str:
    """One folder per (family, arguments): equal arguments share a build."""
    key = json.dumps(overrides, sort_keys=True, default=str)
    return f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_cached(root: Path, family: str, **overrides) -> Path:
    """``build_scaled_model(family, ...)`` under ``root``, once; later calls return the same folder.

    The build goes to a temporary name and is renamed when complete, so an interrupted build is
    never mistaken for a finished one.
    """
    from rlhf_exp.scaled_models import build_scaled_model

    folder = Path(root) / folder_name(family, overrides)
    if not folder.is_dir():
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_scaled_model(family, partial, **overrides)
        partial.rename(folder)
    return folder


def load(folder: Path):
    """(tokenizer, model) through the Auto classes, as the project loads a local model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` as a list of ids (transformers 5 returns a BatchEncoding)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.fixture(scope="session")
def scaled_model(tmp_path_factory):
    """Factory: ``scaled_model("qwen2_5", generation_config={"repetition_penalty": 1.3}) -> Path``."""
    root = tmp_path_factory.getbasetemp() / "scaled_models"
    root.mkdir(exist_ok=True)

    def factory(family: str, **overrides) -> Path:
        return build_cached(root, family, **overrides)

    return factory
