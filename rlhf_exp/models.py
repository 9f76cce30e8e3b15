"""Tokenizers and models: the embedded tiny model, hub/local checkpoints, LoRA.

Everything a phase loads goes through here, so dtype, chat template, attention kernel and LoRA
settings are applied the same way for every phase.
"""

from __future__ import annotations

import contextlib
import os
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


HALF_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def weights_dtype(model_cfg: ModelConfig, hardware: HardwareConfig, trained: bool = True) -> torch.dtype:
    """The dtype weights are held in. The mixed-precision rule:

    - Weights trained in full (``trained=True``) under ``hardware.precision=bf16/fp16`` are held in fp32: the
      trainer autocasts each forward to the half dtype, and the optimizer updates fp32 master weights (an Adam
      step on bf16 weights loses updates smaller than bf16's resolution, ~0.4% of a weight).
    - Except under DeepSpeed (``hardware.distributed=deepspeed_zero*``): its bf16/fp16 optimizer keeps the fp32
      master copy itself, so the model is loaded in the half dtype (fp32 weights would be held twice).
    - Frozen weights (``trained=False``: PPO's reference and reward model, the base under LoRA adapters) are only
      run forward: they load in the half dtype, half the memory.
    - The half dtype is ``model.dtype`` when set (presets say bfloat16), else the precision's (fp32 runs: fp32).
      ``model.dtype=float32`` always means float32.
    """
    precision, named = str(hardware.precision), str(model_cfg.dtype)
    if named == "float32":
        return torch.float32
    half = HALF_DTYPES[precision] if named == "auto" else named
    if trained and precision in ("bf16", "fp16") and not str(hardware.distributed).startswith("deepspeed"):
        return torch.float32
    return _DTYPES[half]


_ATTENTION_NOTICE: list[str] = []  # the sdpa fallback is said once per process


def attention(model_cfg: ModelConfig, hardware: HardwareConfig, dtype: torch.dtype | None = None) -> str:
    """The attention kernel: ``model.attn_implementation`` when set, else ``hardware.attn_implementation``, else
    on CUDA flash_attention_2 when flash-attn is installed (looked up, not imported) and the weights are half
    precision (``dtype``), sdpa otherwise. Weights held in fp32 (trained in full under bf16, see
    :func:`weights_dtype`) get sdpa: flash-attn takes fp16/bf16 only, and outside autocast (generation) their
    projections are fp32; under autocast PyTorch's sdpa runs its own flash kernel."""
    chosen = model_cfg.attn_implementation or hardware.attn_implementation
    if chosen:
        return str(chosen)
    if hardware.accelerator != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if not _ATTENTION_NOTICE and is_main_process():
        _ATTENTION_NOTICE.append("said")
        print("rlhf_exp: flash-attn is not installed: attention runs on sdpa (pip install flash-attn for "
              "flash_attention_2, or set hardware.attn_implementation=sdpa to silence this)", file=sys.stderr)
    return "sdpa"


def quantized(hardware: HardwareConfig) -> bool:
    return bool(hardware.load_in_4bit or hardware.load_in_8bit)


def quantization_kwargs(hardware: HardwareConfig, heads: tuple[str, ...] = ()) -> dict[str, Any]:
    """``quantization_config`` (bitsandbytes) and ``device_map`` for frozen weights under hardware.load_in_4bit /
    load_in_8bit; {} otherwise. ``heads``: modules kept unquantized (a reward or value model's ``score``; a causal
    LM's output embedding is kept by transformers itself)."""
    if not quantized(hardware):
        return {}
    import os

    from transformers import BitsAndBytesConfig

    cpu = hardware.accelerator == "cpu"
    # the dtype the dequantized 4-bit blocks are multiplied in: the precision's half dtype on GPUs; CPU computes fp32
    compute = torch.float32 if cpu else _DTYPES[HALF_DTYPES[str(hardware.precision)]]
    config = BitsAndBytesConfig(
        load_in_4bit=hardware.load_in_4bit,
        load_in_8bit=hardware.load_in_8bit,
        bnb_4bit_quant_type=str(hardware.bnb_4bit_quant_type),
        bnb_4bit_use_double_quant=hardware.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        # a named list replaces transformers' own (tied/output embeddings, last module): heads only when given
        llm_int8_skip_modules=list(heads) or None,
    )
    # quantized weights are placed as they load: on this process's own GPU (one per process), or in CPU RAM
    device_map: Any = "cpu" if cpu else {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"quantization_config": config, "device_map": device_map}


def load_kwargs(model_cfg: ModelConfig, hardware: HardwareConfig, trained: bool = True,
                heads: tuple[str, ...] = ()) -> dict[str, Any]:
    """Arguments for ``from_pretrained``: the one place dtype (:func:`weights_dtype`), attention kernel
    (:func:`attention`) and quantization are chosen. ``trained``: the weights are trained in full (False: frozen,
    including the base of a LoRA model). Only frozen weights are quantized (hardware.load_in_4bit/8bit), never
    the modules named in ``heads``."""
    dtype = weights_dtype(model_cfg, hardware, trained)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention(model_cfg, hardware, dtype),
                              "trust_remote_code": model_cfg.trust_remote_code}
    if not trained:
        kwargs.update(quantization_kwargs(hardware, heads))
    return kwargs


# set by broadcast_loading() while the models FSDP will shard are loaded
_BROADCAST_LOADING: list[bool] = []


@contextlib.contextmanager
def broadcast_loading(hardware: HardwareConfig):
    """While models that FSDP shards are loaded: under ``hardware.distributed=fsdp`` on several processes only
    rank 0 reads the checkpoint; every other process builds the model's skeleton (parameters on the meta device,
    no memory; buffers such as rotary frequencies computed for real) and receives rank 0's weights, one tensor
    at a time, when FSDP shards the model: accelerate's ``cpu_ram_efficient_loading`` in the TRL phases,
    :func:`load_from_rank0` in PPO's FSDP backend. So a node holds one copy of the checkpoint in CPU RAM, not one
    per process. Models loaded outside the block (a frozen reference TRL shards without broadcasting) load
    whole everywhere."""
    active = broadcasts(hardware)
    _BROADCAST_LOADING.append(active)
    try:
        yield active
    finally:
        _BROADCAST_LOADING.pop()


def broadcasts(hardware: HardwareConfig) -> bool:
    """Whether :func:`broadcast_loading` applies: FSDP over several processes, weights not quantized."""
    return str(hardware.distributed) == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not quantized(hardware)


def skeleton_only() -> bool:
    """Inside :func:`broadcast_loading` on a process other than rank 0: load nothing, build the skeleton."""
    return bool(_BROADCAST_LOADING and _BROADCAST_LOADING[-1]) and int(os.environ.get("RANK", "0")) != 0


def skeleton(cls, source: str, **kwargs):
    """The model ``cls.from_pretrained(source, **kwargs)`` would build, with every parameter on the meta device
    (nothing read, nothing allocated) and real buffers; its generation settings as saved with the checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    hub = {k: kwargs.pop(k) for k in ("revision", "trust_remote_code") if k in kwargs}
    labels = {k: kwargs.pop(k) for k in ("num_labels",) if k in kwargs}
    config = AutoConfig.from_pretrained(source, **hub, **labels)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=kwargs.get("dtype"), attn_implementation=kwargs.get("attn_implementation"),
                                trust_remote_code=hub.get("trust_remote_code", False))
    model.tie_weights()  # as from_pretrained does (tie_word_embeddings): one parameter, as on rank 0
    if model.can_generate():
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(source, revision=hub.get("revision"))
    return model


def load_from_rank0(model, full_state: dict | None, device: torch.device) -> None:
    """Fill a model FSDP has just sharded with rank 0's whole weights (``full_state``; None on the other ranks).
    The skeletons of :func:`broadcast_loading` first get storage for their shards on ``device`` (where FSDP keeps
    them: this process's GPU, or CPU RAM under offloading); then every tensor is broadcast from rank 0 and each
    process keeps its shard. Buffers (never sharded, already real in a skeleton) are kept; tied weights stay
    tied (the storage is made in place)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.device.type == "meta" for p in model.parameters()):
        buffers = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}
        model.to_empty(device=device)
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = value.to(device)
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def from_pretrained(cls, source: str, what: str, **kwargs):
    """``cls.from_pretrained`` with transformers' load report (a table of UNEXPECTED/MISSING keys, e.g.
    when a scalar head is put on a language model) replaced by one line of ours saying what was new
    and what was left unused; a load without surprises says nothing. Inside :func:`broadcast_loading`, the
    processes other than rank 0 build the skeleton only."""
    if skeleton_only():
        return skeleton(cls, source, **kwargs)
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
    if kwargs.get("device_map") == "cpu":
        keep_4bit_trainable_on_cpu(model)
    return model


def keep_4bit_trainable_on_cpu(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer's weights into a CPU inference layout the first time the layer runs
    in eval mode without gradients (on CPUs with AVX512-BF16), and never packs them back: training after an
    evaluation (the initial gold score, eval loss) then fails in its packed path with a bias ("a view of a leaf
    Variable that requires grad is being used in an in-place operation", Qwen2's q/k/v projections), and merging
    adapters reads the wrong layout. The packing is turned off; 4-bit layers keep the layout they train in."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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


def load_causal_lm(model_cfg: ModelConfig, hardware: HardwareConfig, tokenizer, checkpoint: str | None = None, *,
                   trained: bool = True):
    """Policy weights: a parent run's checkpoint, the embedded model, or the hub/local model. ``trained=False``
    for weights that stay frozen (PPO's reference; the base under LoRA: ``trained=not hardware.lora``)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(model_cfg, hardware, trained)
    if checkpoint is not None:
        model = from_pretrained(AutoModelForCausalLM, checkpoint, "policy", **kwargs)
    elif model_cfg.source == "embedded":
        model = build_tiny_model(model_cfg, tokenizer)
        if "quantization_config" in kwargs:  # built in memory; bitsandbytes quantizes weights as from_pretrained reads them
            import tempfile

            from safetensors.torch import save_model

            with tempfile.TemporaryDirectory() as folder:  # written by hand: save_pretrained writes on rank 0 only
                model.config.to_json_file(f"{folder}/config.json")
                save_model(model, f"{folder}/model.safetensors", metadata={"format": "pt"})
                generation = model.generation_config
                model = from_pretrained(AutoModelForCausalLM, folder, "policy", **kwargs)
                model.generation_config = generation
    else:
        try:
            model = from_pretrained(AutoModelForCausalLM, model_cfg.path, "policy", revision=model_cfg.revision, **kwargs)
        except OSError as exc:
            raise hub_unreachable("model.path", model_cfg.path, exc) from exc
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# heads trained whole, never quantized: transformers' sequence/token classifiers name them score (Llama, Mistral,
# Qwen2) or classifier
HEADS = ("score", "classifier")


def load_reward_model(model_cfg: ModelConfig, hardware: HardwareConfig, tokenizer, checkpoint: str, *,
                      trained: bool = True):
    """A scalar-head sequence classifier initialised from a policy checkpoint (the head is new). PPO's frozen
    reward model: ``trained=False``."""
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained(AutoModelForSequenceClassification, checkpoint, "reward model", num_labels=1,
                            **load_kwargs(model_cfg, hardware, trained, heads=HEADS))
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model


def load_value_model(model_cfg: ModelConfig, hardware: HardwareConfig, checkpoint: str, *, trained: bool = True):
    """PPO's critic: one value per token, initialised from a reward model (its body already reads answers).
    With adapters on its body (phase.critic_lora): ``trained=False``, then :func:`wrap_lora` with ``force=True``."""
    from transformers import AutoModelForTokenClassification

    return from_pretrained(AutoModelForTokenClassification, checkpoint, "value model (critic)", num_labels=1,
                           **load_kwargs(model_cfg, hardware, trained, heads=HEADS))


def lora_config(model_cfg: ModelConfig, hardware: HardwareConfig, task_type: str = "CAUSAL_LM", force: bool = False):
    """peft LoraConfig when ``hardware.lora`` is on (or ``force``), else None (full fine-tuning). For
    "SEQ_CLS"/"TOKEN_CLS" peft trains the head (``score``) whole beside the adapters (modules_to_save)."""
    if not (hardware.lora or force):
        return None
    from peft import LoraConfig

    targets = list(model_cfg.lora_target_modules)
    return LoraConfig(
        r=hardware.lora_r,
        lora_alpha=hardware.lora_alpha,
        lora_dropout=hardware.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=task_type,
        modules_to_save=list(HEADS) if task_type in ("SEQ_CLS", "TOKEN_CLS") else None,
    )


def prepare_for_adapters(model, hardware: HardwareConfig):
    """What a model needs before LoRA adapters go on it. A quantized base: peft's
    ``prepare_model_for_kbit_training`` (freezes the base, casts its unquantized half-precision parameters to
    fp32, and turns on gradient checkpointing when hardware.gradient_checkpointing, with input gradients so the
    checkpointed adapters get theirs). Otherwise only the input gradients under gradient checkpointing."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=hardware.gradient_checkpointing)
    if hardware.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def wrap_lora(model, model_cfg: ModelConfig, hardware: HardwareConfig, task_type: str = "CAUSAL_LM", force: bool = False):
    """The model with LoRA adapters (a peft model), or the model unchanged when hardware.lora is false and not
    ``force`` (PPO's critic under phase.critic_lora). ``task_type`` "CAUSAL_LM", "SEQ_CLS" or "TOKEN_CLS" (heads
    trained whole). Adapters are fp32 (peft's default) except under ZeRO-3 with an unquantized base, where
    DeepSpeed needs every parameter in one dtype (the base's half dtype; its optimizer keeps fp32 masters)."""
    config = lora_config(model_cfg, hardware, task_type, force=force)
    if config is None:
        return model
    from peft import get_peft_model

    from rlhf_exp.launch.sharding import zero_stage

    is_quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    model = prepare_for_adapters(model, hardware)
    return get_peft_model(model, config, autocast_adapter_dtype=not (zero_stage(hardware) == 3 and not is_quantized))


def upcast_trained(model) -> None:
    """A quantized model's trained parameters (adapters, heads) back to fp32 after a TRL trainer made them bf16.
    TRL 1.16 casts QLoRA adapters to bf16 (the QLoRA paper's choice); under our rule whatever is trained is held
    in fp32, so small Adam updates are not rounded away (TRL itself keeps DoRA's magnitude vector fp32 for that
    reason). Call after the trainer is built, before it creates its optimizer. Unquantized models are left alone:
    under ZeRO-3 their adapters share the base's half dtype on purpose (see :func:`wrap_lora`)."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def loading_record(model) -> dict[str, Any]:
    """How a model was loaded, for the run folder (launch/loading.json): whether ZeRO-3's partitioned loading was
    on (``zero3_init``: from_pretrained under deepspeed.zero.Init; the embedded model is built whole), parameters
    held by this process vs in the model (0 for a skeleton waiting for rank 0's weights: :func:`broadcast_loading`),
    dtypes, quantized layers, attention kernel."""
    from collections import Counter

    from transformers.integrations import is_deepspeed_zero3_enabled

    local = total = 0
    dtypes: Counter = Counter()
    for param in model.parameters():
        full = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter: ds_numel in all
        if hasattr(param, "ds_tensor"):
            local += param.ds_tensor.numel()
        elif param.device.type != "meta":  # a skeleton's parameters hold nothing (broadcast_loading)
            local += param.numel()
        total += full
        dtypes[str(param.dtype).removeprefix("torch.")] += full
    layers = Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    return {"zero3_init": is_deepspeed_zero3_enabled(), "partitioned": local < total, "params_total": total,
            "params_this_process": local, "dtypes": dict(dtypes), "quantized_layers": dict(layers),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def merge_adapters(model):
    """A peft model -> the plain model with its adapters merged in. Over a bitsandbytes-quantized base (QLoRA)
    the merge goes into dequantized weights, saved unquantized in the checkpoint's dtype: peft's own merge into
    4-bit layers would round each adapter update into the 4-bit grid (peft warns "may get different generations
    due to rounding errors") and save a 4-bit checkpoint that every later phase would inherit."""
    base = model.get_base_model()
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        return model.merge_and_unload()
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[name] = sum(module.get_delta_weight(a).float() for a in adapters)
    plain = model.unload()  # adapters off, trained heads (modules_to_save) in place, 4-bit layers back
    dtype = plain.config.dtype if isinstance(plain.config.dtype, torch.dtype) else torch.float32
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "The modules are dequantized in torch.float32 ...": what we asked for
    try:
        plain = plain.dequantize(dtype=torch.float32) or plain
    finally:
        hf_logging.set_verbosity(level)
    with torch.no_grad():
        for name, delta in deltas.items():
            plain.get_submodule(name).weight += delta
    plain.is_loaded_in_4bit = plain.is_loaded_in_8bit = False
    return plain.to(dtype)


def merged_lora_state(state: dict, config) -> dict:
    """A peft LoRA model's full state dict (gathered from shards) -> the plain model's, adapters merged into their
    base weights (W + B A * alpha/r) and trained heads (modules_to_save) in place of the originals."""
    return dict(merged_lora_weights(state.items(), config))


def merged_lora_weights(named, config):
    """(name, tensor) pairs of a model -> those of the plain model, one at a time: a peft LoRA model's adapters
    merged into their base weights (W + B A * alpha/r, the training copy untouched), trained heads (modules_to_save)
    in place of the originals, names without peft's prefixes. ``config``: the peft LoraConfig, or None for a plain
    model (pairs pass through). A LoRA layer's base weight is held (copied: a gathered shard may be freed once the
    next is gathered) until both of its adapter matrices have passed."""
    import math

    if config is None:
        yield from named
        return
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    pending: dict[str, dict] = {}  # LoRA layer -> the parts of it seen so far
    for key, value in named:
        name = key.removeprefix("base_model.model.")
        if ".original_module." in name:
            continue
        part = next((p for p in (".base_layer.weight", ".lora_A.default.weight", ".lora_B.default.weight")
                     if name.endswith(p)), None)
        if part is None:
            if ".lora_" not in name:  # other adapters' matrices, dropout, magnitude vectors: not weights of the model
                yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), value
            continue
        layer = name.removesuffix(part)
        parts = pending.setdefault(layer, {})
        parts[part] = value.detach().clone()
        if len(parts) == 3:
            del pending[layer]
            base, a, b = parts[".base_layer.weight"], parts[".lora_A.default.weight"], parts[".lora_B.default.weight"]
            yield f"{layer}.weight", (base.float() + (b.float() @ a.float()) * scaling).to(base.dtype)
    for layer, parts in pending.items():  # a base layer whose adapter is not there: as it is
        if ".base_layer.weight" in parts:
            yield f"{layer}.weight", parts[".base_layer.weight"]


def save_gathered(model, state_dict: dict, path) -> None:
    """Rank 0: a model's whole state dict (gathered from the shards of a ZeRO-3/FSDP run) into ``path`` as
    save_pretrained writes it; a peft model's adapters merged into their weights first (:func:`merged_lora_state`)
    and a head tied to the embeddings saved once, as a whole model's save_pretrained does."""
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}
    if hasattr(model, "peft_config"):
        state_dict = merged_lora_state(state_dict, model.peft_config["default"])
        model = model.get_base_model()
    if getattr(model.config, "tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict)


def save_for_next_phase(model, tokenizer, path: Path, kind: str, step: int, run_id: str, trainer=None) -> Path:
    """Save full weights + tokenizer where the next phase loads them; LoRA adapters are merged in.

    ``checkpoint.json`` labels what the folder holds (a policy or a reward model), from which run and
    step, and when, so reward-model checkpoints are never mistaken for policies. The folder is written
    under a temporary name and renamed when complete: a save that fails (a full disk) leaves no
    half-written checkpoint behind, and says so. With ``trainer`` (a sharded run: ZeRO-3 or FSDP)
    every process calls the trainer's save, which gathers the shards into whole weights on rank 0 (with LoRA: the
    whole state is gathered and the adapters merged on rank 0, as for an unsharded model).
    """
    import datetime as dt
    import errno
    import json
    import shutil

    partial = path.with_name(f".{path.name}.partial")
    try:
        # (a transformers Trainer; PPO's sharded backends gather and merge in their own save_model)
        if trainer is not None and hasattr(getattr(trainer, "model", None), "peft_config"):
            # the trainer would save the adapters alone; gather the whole state instead (a collective) and merge
            engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
            state = trainer.accelerator.get_state_dict(engine)
            if is_main_process():
                shutil.rmtree(partial, ignore_errors=True)
                save_gathered(trainer.model, state, partial)
        elif trainer is not None:
            trainer.save_model(str(partial))  # a collective: every rank
        if not is_main_process():  # rank 0 holds the same weights and writes them
            return path
        if trainer is None:
            if hasattr(model, "merge_and_unload"):
                model = merge_adapters(model)
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
