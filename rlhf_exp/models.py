"""Tokenizers and models: the embedded tiny model, hub/local checkpoints, LoRA.

Everything a phase loads goes through here, so dtype, chat template, attention kernel and LoRA
settings are applied the same way for every phase.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from rlhf_exp.config.errors import ConfigError, hub_unreachable
from rlhf_exp.config.schema import HardwareConfig, ModelConfig
from rlhf_exp.tracking.run import is_main_process

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TINY_VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "=", *map(str, range(10))]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_tokenizer():
    """A word-level tokenizer over digits, '=' and four special tokens, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=64,
    )
    return tokenizer


def build_tiny_model(model_cfg: ModelConfig, tokenizer):
    """A small Llama built from ``model.embedded``; identical weights for the same init_seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = model_cfg.embedded
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(arch.init_seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _apply_chat_template(tokenizer, model_cfg: ModelConfig) -> None:
    name = model_cfg.chat_template
    if not name:
        return
    path = TEMPLATES_DIR / f"{name}.jinja" if "/" not in name and not name.endswith(".jinja") else Path(name)
    tokenizer.chat_template = path.read_text()


def load_tokenizer(model_cfg: ModelConfig, checkpoint: str | None = None):
    """Tokenizer of a parent checkpoint, of the embedded model, or of the hub/local model."""
    from transformers import AutoTokenizer

    if checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if tokenizer.chat_template is None:  # a parent trained on plain text has none: add model.chat_template
            _apply_chat_template(tokenizer, model_cfg)
    elif model_cfg.source == "embedded":
        tokenizer = build_tiny_tokenizer()
    else:
        from rlhf_exp.config.validate import missing_model_folder

        problem = missing_model_folder(model_cfg.path)
        if problem:
            raise ConfigError(problem)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_cfg.path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
        except OSError as exc:  # transformers reports unreachable and unknown repos as OSError
            raise hub_unreachable("model.path", model_cfg.path, exc) from exc
        _apply_chat_template(tokenizer, model_cfg)
    if model_cfg.eos_token and tokenizer.eos_token != model_cfg.eos_token:
        # a base model whose chat template ends turns with another token than its tokenizer's EOS (Llama 3.1
        # base: <|end_of_text|> vs <|eot_id|>): answers must end, and generation stop, at the turn's end
        if model_cfg.eos_token not in tokenizer.get_vocab():
            raise ConfigError(f"model.eos_token={model_cfg.eos_token}: not a token of {model_cfg.path}'s tokenizer")
        tokenizer.eos_token = model_cfg.eos_token
    if tokenizer.pad_token is None:
        # Llama 3 and Mistral ship no pad token; padding is masked, so reusing EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_chat_template(tokenizer, model_cfg: ModelConfig, dataset) -> None:
    """Chat-message data need a chat template; without one TRL fails deep inside tokenisation."""
    if tokenizer.chat_template is None and len(dataset) and isinstance(dataset[0]["prompt"], list):
        raise ConfigError(f"model.path={model_cfg.path}: its tokenizer has no chat template, and the data are chat "
                          "messages.\nSet model.chat_template=chatml (or a .jinja file), or give the data as plain strings.")


def load_kwargs(model_cfg: ModelConfig, hardware: HardwareConfig) -> dict[str, Any]:
    """Arguments for ``from_pretrained``: the one place dtype and attention kernel are chosen."""
    dtype = str(model_cfg.dtype)
    if dtype == "auto":
        # weights in the precision the run computes in: an fp32 run never trains bf16 weights
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[str(hardware.precision)]
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation and hardware.accelerator == "cuda":
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    return kwargs


def from_pretrained(cls, source: str, what: str, **kwargs):
    """``cls.from_pretrained`` with transformers' load report (a table of UNEXPECTED/MISSING keys, e.g.
    when a scalar head is put on a language model) replaced by one line of ours saying what was new
    and what was left unused; a load without surprises says nothing."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    line = load_summary(what, source, info)
    if line and is_main_process():
        print(line, file=sys.stderr)
    return model


def load_summary(what: str, source: str, info: dict) -> str | None:
    def names(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if info.get("missing_keys"):
        parts.append(f"new, randomly initialised: {names(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        mismatched = [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        parts.append(f"re-initialised (shape differs): {names(mismatched)}")
    if info.get("unexpected_keys"):
        parts.append(f"left unused from the checkpoint: {names(info['unexpected_keys'])}")
    return f"rlhf_exp: {what} from {source}: " + "; ".join(parts) if parts else None


def load_causal_lm(model_cfg: ModelConfig, hardware: HardwareConfig, tokenizer, checkpoint: str | None = None):
    """Policy weights: a parent run's checkpoint, the embedded model, or the hub/local model."""
    from transformers import AutoModelForCausalLM

    if checkpoint is not None:
        model = from_pretrained(AutoModelForCausalLM, checkpoint, "policy", **load_kwargs(model_cfg, hardware))
    elif model_cfg.source == "embedded":
        model = build_tiny_model(model_cfg, tokenizer)
    else:
        try:
            model = from_pretrained(AutoModelForCausalLM, model_cfg.path, "policy", revision=model_cfg.revision,
                                    **load_kwargs(model_cfg, hardware))
        except OSError as exc:
            raise hub_unreachable("model.path", model_cfg.path, exc) from exc
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(model_cfg: ModelConfig, hardware: HardwareConfig, tokenizer, checkpoint: str):
    """A scalar-head sequence classifier initialised from a policy checkpoint (the head is new)."""
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained(AutoModelForSequenceClassification, checkpoint, "reward model", num_labels=1,
                            **load_kwargs(model_cfg, hardware))
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model


def load_value_model(model_cfg: ModelConfig, hardware: HardwareConfig, checkpoint: str):
    """PPO's critic: one value per token, initialised from a reward model (its body already reads answers)."""
    from transformers import AutoModelForTokenClassification

    return from_pretrained(AutoModelForTokenClassification, checkpoint, "value model (critic)", num_labels=1,
                           **load_kwargs(model_cfg, hardware))


def lora_config(model_cfg: ModelConfig, hardware: HardwareConfig, task_type: str = "CAUSAL_LM"):
    """peft LoraConfig when ``hardware.lora`` is on, else None (full fine-tuning)."""
    if not hardware.lora:
        return None
    from peft import LoraConfig

    targets = list(model_cfg.lora_target_modules)
    return LoraConfig(
        r=hardware.lora_r,
        lora_alpha=hardware.lora_alpha,
        lora_dropout=hardware.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=task_type,
    )


def save_for_next_phase(model, tokenizer, path: Path, kind: str, step: int, run_id: str, trainer=None) -> Path:
    """Save full weights + tokenizer where the next phase loads them; LoRA adapters are merged in.

    ``checkpoint.json`` labels what the folder holds (a policy or a reward model), from which run and
    step, and when, so reward-model checkpoints are never mistaken for policies. The folder is written
    under a temporary name and renamed when complete: a save that fails (a full disk) leaves no
    half-written checkpoint behind, and says so. With ``trainer`` (a sharded run: ZeRO-3 or FSDP)
    every process calls the trainer's save, which gathers the shards into whole weights on rank 0.
    """
    import datetime as dt
    import errno
    import json
    import shutil


    partial = path.with_name(f".{path.name}.partial")
    try:
        if trainer is not None:
            trainer.save_model(str(partial))  # a collective: every rank
        if not is_main_process():  # rank 0 holds the same weights and writes them
            return path
        if trainer is None:
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        label = {"kind": kind, "run_id": run_id, "step": step,
                 "saved_at": dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")}
        (partial / "checkpoint.json").write_text(json.dumps(label, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"disk full while saving the {kind} checkpoint to {path} ({exc.strerror}); "
                                     "nothing half-written was kept: free space, or move output_root") from exc
        raise
    return path
