"""Cross-field rules, checked once after composition and before anything heavy is imported.

Single-field choices are Enums in the schema (OmegaConf rejects a bad value at compose time); what
needs two or more fields lives here. Every rule names the keys involved and says what to change;
``validate`` gathers all problems and raises one ConfigError, so a command line is fixed in one go.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError, unknown_key_message
from rlhf_exp.config.schema import GROUP_SCHEMAS, PHASE_SCHEMAS, RunConfig, resumable_checkpoints

# rlhf_exp/templates/<name>.jinja: our copies of the presets' chat templates (for base models and local folders)
BUILTIN_TEMPLATES = ("chatml", "llama3_1", "mistral_v03", "qwen2_5")


def missing_model_folder(path: str | None) -> str | None:
    """The message for a model.path that names a local folder which is not there (a hub id is org/name;
    anything else is a folder, which transformers would misreport as a bad repo id), else None."""
    if not path:
        return None
    local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    if local and not Path(path).expanduser().is_dir():
        return (f"model.path={path}: no such folder. Fix the path (a folder saved with save_pretrained, e.g. a run's "
                "checkpoints/final), or give a hub id (org/name).")
    return None


def _extra_keys(node, schema, prefix: str) -> list[str]:
    """Keys added with ``+key=...`` that no schema declares (Hydra lets ``+`` through struct mode)."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    extra = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in names:
            extra.append(full)
            continue
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        f = names[key]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(sub):
            extra += _extra_keys(child, type(sub), full + ".")
    return extra


def _structure_errors(cfg: DictConfig, phase_name: str | None) -> list[str]:
    errors = []
    for key in OmegaConf.missing_keys(cfg):
        errors.append(f"{key} is required here: add {key}=<value>")
    root_fields = {f.name for f in dataclasses.fields(RunConfig)}
    for key in cfg.keys():
        if key not in root_fields:
            errors.append(unknown_key_message(str(key), phase_name))
        elif key in GROUP_SCHEMAS or key == "phase":
            schema = PHASE_SCHEMAS.get(phase_name) if key == "phase" else GROUP_SCHEMAS[key]
            if schema is not None and isinstance(cfg[key], DictConfig):
                errors += [unknown_key_message(k, phase_name) for k in _extra_keys(cfg[key], schema, key + ".")]
    return errors


def _rollout_engine_errors(phase, hw, model) -> list[str]:
    """phase.rollout_engine and the generation settings that go with it (docs/ppo-at-scale.md)."""
    errors = []
    if str(phase.rollout_engine) == "vllm":
        positions = _max_positions(model)
        if positions is not None and phase.max_length > positions:
            errors.append(f"phase.max_length={phase.max_length} with phase.rollout_engine=vllm: the model "
                          f"({model.path}) has max_position_embeddings={positions}, and vLLM refuses a longer context; "
                          f"set phase.max_length<={positions}")
        if hw.accelerator != "cuda":
            errors.append(f"phase.rollout_engine=vllm with hardware={hw.name} ({hw.accelerator}): vLLM runs on CUDA GPUs "
                          "only; use phase.rollout_engine=hf here (or a GPU preset, e.g. hardware=a100x1)")
        if str(phase.rollout_logprobs) == "generate":
            errors.append("phase.rollout_logprobs=generate with phase.rollout_engine=vllm: vLLM's log-probabilities come "
                          "from its own kernels, not from the policy PPO trains, so its ratio would not start at 1; "
                          "use phase.rollout_logprobs=auto (a forward of the policy recomputes them)")
        if hw.load_in_4bit or hw.load_in_8bit:
            errors.append("phase.rollout_engine=vllm with a quantized policy (hardware.load_in_4bit/8bit): the engine "
                          "would hold an unquantized copy of the merged weights; use phase.rollout_engine=hf")
        if str(phase.generation_cache) != "dynamic" or phase.compile_generation:
            errors.append("phase.generation_cache / phase.compile_generation set the hf engine's generate(); with "
                          "phase.rollout_engine=vllm leave them at their defaults (dynamic, false)")
        if not 0 < phase.vllm_gpu_memory_utilization < 1:
            errors.append(f"phase.vllm_gpu_memory_utilization={phase.vllm_gpu_memory_utilization}: must be in (0, 1) "
                          "(the share of each GPU's memory the engine takes)")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            errors.append("phase.rollout_engine=vllm but vLLM is not installed in this environment: pip install "
                          "'rlhf_exp[vllm]' (on the GPU machines), or use phase.rollout_engine=hf")
    elif phase.vllm_sleep:
        errors.append("phase.vllm_sleep=true sets the vllm engine; it does nothing with phase.rollout_engine=hf")
    if phase.compile_generation:
        if str(phase.generation_cache) != "static":
            errors.append("phase.compile_generation=true needs fixed shapes: set phase.generation_cache=static too")
        if str(hw.distributed) in ("fsdp", "deepspeed_zero3"):
            errors.append(f"phase.compile_generation=true with hardware.distributed={hw.distributed}: a sharded policy "
                          "gathers each layer's weights as generation reaches it, which a compiled graph cannot "
                          "hold; set phase.compile_generation=false")
    return errors


def _max_positions(model) -> int | None:
    """max_position_embeddings from a local model folder's config.json (None for a hub id or an unreadable file)."""
    import json

    folder = Path(str(model.path or "")).expanduser()
    if model.source != "hub" or not model.path or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
    return value if isinstance(value, int) else None


def validate(cfg: DictConfig) -> None:
    phase_name = OmegaConf.select(cfg, "phase.name")
    errors = _structure_errors(cfg, phase_name)
    if errors:
        raise ConfigError("\n".join(errors))

    model, data, phase, hw = cfg.model, cfg.data, cfg.phase, cfg.hardware

    def check(condition: bool, message: str) -> None:
        if not condition:
            errors.append(message)

    # phase
    check(phase_name in PHASE_SCHEMAS, f"phase.name={phase_name}: must be one of {', '.join(PHASE_SCHEMAS)}")
    check(phase.learning_rate > 0, f"phase.learning_rate={phase.learning_rate}: must be > 0")
    check(phase.lora_learning_rate is None or phase.lora_learning_rate > 0,
          f"phase.lora_learning_rate={phase.lora_learning_rate}: must be > 0, or null (phase.learning_rate)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length", "logging_steps", "max_new_tokens"):
        check(phase[key] >= 1, f"phase.{key}={phase[key]}: must be >= 1")
    check(phase.num_epochs > 0 or phase.max_steps > 0,
          "phase.num_epochs and phase.max_steps are both <= 0: set phase.num_epochs=1 or phase.max_steps=N")
    check(0 <= phase.warmup_ratio < 1, f"phase.warmup_ratio={phase.warmup_ratio}: must be in [0, 1)")
    check(phase.early_stopping_patience >= 0, "phase.early_stopping_patience must be >= 0 (0 = never stop early)")
    check(phase.eval_steps is None or phase.eval_steps >= 1, "phase.eval_steps must be >= 1, or null (each epoch)")
    check(phase.keep_checkpoints >= 1, f"phase.keep_checkpoints={phase.keep_checkpoints}: must be >= 1")
    check(phase.save_minutes is None or phase.save_minutes > 0,
          f"phase.save_minutes={phase.save_minutes}: must be > 0, or null (no time-based checkpoints)")
    check(phase.skip_nonfinite_batches >= 0, f"phase.skip_nonfinite_batches={phase.skip_nonfinite_batches}: must be >= 0")
    if phase.save_steps is not None:
        check(phase.save_steps >= 1, f"phase.save_steps={phase.save_steps}: must be >= 1, or null")
        check(phase_name == "ppo" or phase.early_stopping_patience == 0
              or (phase.eval_steps and phase.save_steps % phase.eval_steps == 0),
              f"phase.save_steps={phase.save_steps} with early stopping: checkpoints must fall on evaluations; set "
              f"phase.eval_steps to a divisor of it (now {phase.eval_steps}), or phase.early_stopping_patience=0")
    check(str(cfg.resume) in ("auto", "never") or Path(str(cfg.resume)).is_dir(),
          f"resume={cfg.resume}: use auto, never, or a run folder to continue")
    if phase_name == "dpo":
        check(phase.beta > 0, f"phase.beta={phase.beta}: must be > 0 (typical 0.01-0.5)")
        check(phase.eval_num_prompts >= 0, f"phase.eval_num_prompts={phase.eval_num_prompts}: must be >= 0 (0: off)")
    if phase_name in ("ppo", "dpo"):
        check(phase.eval_samples >= 0, f"phase.eval_samples={phase.eval_samples}: must be >= 0 (0 or 1: no self-BLEU)")
    if phase_name == "ppo":
        check(0 < phase.cliprange < 1, f"phase.cliprange={phase.cliprange}: must be in (0, 1)")
        check(phase.kl_coef >= 0, f"phase.kl_coef={phase.kl_coef}: must be >= 0")
        check(0 <= phase.lam <= 1 and 0 <= phase.gamma <= 1, "phase.gamma and phase.lam must be in [0, 1]")
        check(phase.kl_target > 0 and phase.kl_horizon >= 1, "phase.kl_target must be > 0 and phase.kl_horizon >= 1")
        check(phase.temperature > 0, f"phase.temperature={phase.temperature}: must be > 0")
        # PPO's ratio compares log-probabilities of the distribution the answers were sampled from; a nucleus
        # truncated under the rollout policy is not the one the updated policy defines, so it is refused
        check(phase.top_p == 1, f"phase.top_p={phase.top_p}: PPO samples from the full distribution whose "
                                "log-probabilities its update uses; top-p truncation would make them disagree. "
                                "Set phase.top_p=1.0 (lower phase.temperature to sample more conservatively)")
        check(phase.ppo_epochs >= 1 and 1 <= phase.num_mini_batches <= phase.rollout_batch_size,
              f"phase.ppo_epochs must be >= 1 and phase.num_mini_batches in [1, phase.rollout_batch_size="
              f"{phase.rollout_batch_size}]")
        check(phase.target_kl is None or phase.target_kl > 0, "phase.target_kl must be > 0, or null (never stop early)")
        check(phase.eval_num_prompts >= 1, f"phase.eval_num_prompts={phase.eval_num_prompts}: must be >= 1")
        check(phase.best_kl_max is None or phase.best_kl_max > 0,
              f"phase.best_kl_max={phase.best_kl_max}: must be > 0, or null (2 x phase.kl_target)")
        world = cfg.hardware.num_processes * cfg.hardware.num_nodes
        check(phase.rollout_batch_size % (phase.num_mini_batches * world) == 0,
              f"phase.rollout_batch_size={phase.rollout_batch_size} must split evenly into phase.num_mini_batches="
              f"{phase.num_mini_batches} mini-batches x {world} processes (hardware={cfg.hardware.name})")
        share = phase.rollout_batch_size // (phase.num_mini_batches * world)
        check(phase.micro_batch_size is None or phase.micro_batch_size >= share
              or (phase.micro_batch_size >= 1 and share % phase.micro_batch_size == 0),
              f"phase.micro_batch_size={phase.micro_batch_size} must divide each process's share of a mini-batch: "
              f"rollout_batch_size {phase.rollout_batch_size} / num_mini_batches {phase.num_mini_batches} / {world} "
              f"process(es) = {share} sequences; use a divisor of {share}, or null")
        check(phase.critic_learning_rate > 0, f"phase.critic_learning_rate={phase.critic_learning_rate}: must be > 0")
        errors += _rollout_engine_errors(phase, hw, cfg.model)
        # DeepSpeed applies what its engines accumulated at the mini-batch's end: a bad batch cannot be dropped
        check(not (str(hw.distributed).startswith("deepspeed") and phase.skip_nonfinite_batches > 0),
              f"phase.skip_nonfinite_batches={phase.skip_nonfinite_batches} with hardware.distributed={hw.distributed}: "
              "PPO under DeepSpeed stops on a NaN/inf loss (its engines cannot drop an accumulated update); set "
              "phase.skip_nonfinite_batches=0, or use hardware.distributed=fsdp or ddp")

    # model
    if model.source == "hub":
        check(bool(model.path), f"model={model.name} loads from the hub but model.path is empty: set model.path=org/name")
        problem = missing_model_folder(model.path)
        check(problem is None, problem or "")
    if model.source == "embedded":
        arch = model.embedded
        check(arch.hidden_size % arch.num_heads == 0,
              f"model.embedded.hidden_size={arch.hidden_size} must be divisible by model.embedded.num_heads={arch.num_heads}")
        check(data.source == "synthetic" and data.synthetic.form == "plain",
              f"model={model.name} has the embedded 15-token tokenizer (digits and '=', no chat template), which only "
              f"covers data=synthetic; use a model with a real tokenizer (model=local model.path=<folder>, or a hub "
              f"preset) with data={data.name}")
    if model.dtype in ("bfloat16", "float16") and hw.precision == "fp32":
        check(False, f"model.dtype={model.dtype} with hardware.precision=fp32 would train half-precision weights "
                     f"without mixed precision: use a GPU preset (e.g. hardware=a100x1, bf16) or model.dtype=float32")
    if model.chat_template and model.chat_template not in BUILTIN_TEMPLATES:
        check(Path(model.chat_template).expanduser().is_file(),
              f"model.chat_template={model.chat_template}: neither a built-in template "
              f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing .jinja file")

    # data
    if data.source == "hub":
        check(bool(data.path), f"data={data.name} loads from the hub but data.path is empty: set data.path=org/name")
    from rlhf_exp.data.sources import check_data_files

    try:  # local files (data=jsonl, or a hub preset's data.path pointing at a local copy)
        check_data_files(data)
    except ConfigError as exc:
        errors.append(str(exc))
    check(0 < data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction}: must be in (0, 1)")
    if data.source == "synthetic":
        errors += _synthetic_errors(cfg)

    # hardware
    check(hw.num_processes >= 1 and hw.num_nodes >= 1, "hardware.num_processes and hardware.num_nodes must be >= 1")
    if hw.accelerator == "cpu":
        # bf16 stays allowed: CPU autocast trains the embedded task as fp32 does (60 steps: gold 0.764 vs 0.783)
        check(hw.precision != "fp16", "hardware.precision=fp16 needs a GPU: use precision=fp32 (or bf16) with accelerator=cpu")
    else:
        check(hw.gpus_per_node >= 1, "hardware.accelerator=cuda needs hardware.gpus_per_node >= 1")
        check(hw.num_processes <= hw.gpus_per_node,
              f"hardware.num_processes={hw.num_processes} exceeds hardware.gpus_per_node={hw.gpus_per_node}: "
              "use one process per GPU")
    check(cfg.launcher.max_num_timeout >= 0, f"launcher.max_num_timeout={cfg.launcher.max_num_timeout}: must be >= 0")
    check(cfg.launcher.name != "slurm" or cfg.launcher.max_num_timeout == 0 or resumable_checkpoints(phase),
          f"launcher.max_num_timeout={cfg.launcher.max_num_timeout} requeues a job at its time limit, but phase.save_steps "
          "and phase.save_minutes are both null: a requeued job would start over; set one of them")
    check(not (hw.distributed == "none" and hw.num_processes * hw.num_nodes > 1),
          f"hardware.distributed=none with {hw.num_processes * hw.num_nodes} processes: set hardware.distributed=ddp")
    if hw.lora:
        check(hw.lora_r >= 1 and hw.lora_alpha >= 1, "hardware.lora_r and hardware.lora_alpha must be >= 1")
    errors += _hardware_errors(cfg)
    errors += _monitor_errors(cfg)

    if errors:
        raise ConfigError("\n".join(errors))


def _monitor_errors(cfg: DictConfig) -> list[str]:
    """monitor.* (rlhf_exp.monitor): sizes >= 1, thresholds in range, a checkpoint mode that can save."""
    mon = cfg.get("monitor")
    if mon is None:
        return []
    errors = []
    if mon.window < 2:
        errors.append(f"monitor.window={mon.window}: must be >= 2 (steps per moving window)")
    if mon.warmup_steps < 0:
        errors.append(f"monitor.warmup_steps={mon.warmup_steps}: must be >= 0")
    for key in ("kl_max", "kl_min", "entropy_min", "gold_drop"):
        if mon[key] is not None and not mon[key] > 0:
            errors.append(f"monitor.{key}={mon[key]}: must be > 0, or null (rule off)")
    if mon.kl_max is not None and mon.kl_min is not None and mon.kl_min >= mon.kl_max:
        errors.append(f"monitor.kl_min={mon.kl_min} must be below monitor.kl_max={mon.kl_max}")
    if mon.length_growth is not None and not mon.length_growth > 1:
        errors.append(f"monitor.length_growth={mon.length_growth}: must be > 1 (a ratio of lengths), or null (rule off)")
    for key in ("entropy_drop", "distinct_drop", "self_bleu_rise"):
        if mon[key] is not None and not 0 < mon[key] < 1:
            errors.append(f"monitor.{key}={mon[key]}: must be in (0, 1), or null (rule off)")
    if mon.length_reward_corr is not None and not -1 < mon.length_reward_corr < 1:
        errors.append(f"monitor.length_reward_corr={mon.length_reward_corr}: must be in (-1, 1), or null (rule off)")
    if not 0 <= mon.corr_rise < 2:
        errors.append(f"monitor.corr_rise={mon.corr_rise}: must be in [0, 2)")
    phase = cfg.phase
    if (mon.enabled and str(mon.on_alarm) == "checkpoint" and OmegaConf.select(cfg, "phase.name") in ("ppo", "dpo")
            and not resumable_checkpoints(phase)):
        errors.append("monitor.on_alarm=checkpoint saves a resumable checkpoint at an alarm, but phase.save_steps and "
                      "phase.save_minutes are both null (no checkpoints): set one of them, or monitor.on_alarm=warn|stop")
    return errors


def _installed(module: str) -> bool:
    """Whether a package can be imported, without importing it (validate runs before anything heavy)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _hardware_errors(cfg: DictConfig) -> list[str]:
    """Quantization, optimizer, offload, attention and precision against the device and the sharding."""
    hw, model = cfg.hardware, cfg.model
    kind = str(hw.distributed)
    errors = []
    quant = [f"hardware.load_in_{bits}bit=true" for bits in (4, 8) if hw[f"load_in_{bits}bit"]]
    if len(quant) == 2:
        errors.append("hardware.load_in_4bit and hardware.load_in_8bit are both true: pick one (4-bit nf4 is QLoRA's)")
    if quant and not hw.lora:
        errors.append(f"{quant[0]} with hardware.lora=false: quantized weights are frozen and cannot be fine-tuned in "
                      f"full; add hardware.lora=true (QLoRA: adapters train on the quantized base), or set "
                      f"{quant[0].replace('true', 'false')} to fine-tune full-precision weights")
    if quant and kind in ("deepspeed_zero3", "fsdp"):
        # ZeRO-3 refuses the device_map quantized loading uses ("DeepSpeed Zero-3 is not compatible with passing a
        # `device_map`"); without it (bnb_4bit_quant_storage = the other weights' dtype) 4-bit LoRA did train on
        # CPU processes, but the checkpoint for the next phase needs the adapters merged into gathered weights, and
        # gathered 4-bit shards are bitsandbytes' packed storage, not weights
        errors.append(f"{quant[0]} with hardware.distributed={kind}: quantized weights are not sharded here (the "
                      f"model's whole weights could not be gathered and merged for the next phase); QLoRA fits one "
                      f"GPU per process: use hardware.distributed=ddp (each process holds the whole 4-bit base) "
                      f"or none")
    phase_name = OmegaConf.select(cfg, "phase.name")
    if kind == "fsdp" and hw.accelerator == "cpu" and phase_name != "ppo":
        # accelerate 1.15 turns its FSDP plugin on for GPU process groups only; with CPU processes the TRL trainer
        # then wraps the model in DDP without a word (measured: no FSDP plugin in the accelerator's state)
        errors.append(f"hardware.distributed=fsdp with hardware.accelerator=cpu for phase={phase_name}: accelerate "
                      f"shards with FSDP on GPUs only, and on CPU processes the trainer would run plain DDP with a "
                      f"whole model per process; use hardware.distributed=deepspeed_zero3 (shards on CPU processes "
                      f"too) or ddp (phase=ppo's own FSDP does run on CPU processes)")
    if quant and not _installed("bitsandbytes"):
        errors.append(f"{quant[0]} needs bitsandbytes: pip install -e '.[quant]'")
    # an 8-bit optimizer under DeepSpeed is allowed: the trainer hands it to DeepSpeed as the client optimizer
    # (measured under ZeRO-3 on 2 CPU processes: the same learning as torch AdamW); only offload replaces it
    if hw.optimizer != "adamw_torch":
        if not _installed("bitsandbytes"):
            errors.append(f"hardware.optimizer={hw.optimizer} needs bitsandbytes: pip install -e '.[quant]' "
                          "(or hardware.optimizer=adamw_torch)")
        if hw.offload_optimizer:
            errors.append(f"hardware.optimizer={hw.optimizer} with hardware.offload_optimizer=true: DeepSpeed then "
                          "steps with its own CPU Adam, not this optimizer; drop one of them")
    # offload: where the states go, and who can move them
    if hw.offload_params and kind not in ("deepspeed_zero3", "fsdp"):
        errors.append(f"hardware.offload_params=true with hardware.distributed={kind}: only sharded parameters are "
                      "offloaded; use hardware.distributed=deepspeed_zero3 or fsdp, or hardware.offload_params=false")
    if hw.offload_optimizer and not kind.startswith("deepspeed"):
        fsdp = " (FSDP offloads parameters, gradients and optimizer states together: hardware.offload_params=true)"
        errors.append(f"hardware.offload_optimizer=true with hardware.distributed={kind}: optimizer states are "
                      f"offloaded by DeepSpeed ZeRO; use hardware.distributed=deepspeed_zero2 or deepspeed_zero3"
                      f"{fsdp if kind == 'fsdp' else ''}, or hardware.offload_optimizer=false")
    # attention kernel and precision against the device
    attn = model.attn_implementation or hw.attn_implementation
    attn_key = "model.attn_implementation" if model.attn_implementation else "hardware.attn_implementation"
    if attn == "flash_attention_2":
        if hw.accelerator == "cpu":
            errors.append(f"{attn_key}=flash_attention_2 with hardware.accelerator=cpu: flash-attn runs on CUDA GPUs "
                          f"only; set {attn_key}=sdpa (or leave hardware.attn_implementation null)")
        elif hw.precision == "fp32":
            errors.append(f"{attn_key}=flash_attention_2 with hardware.precision=fp32: flash-attn computes in fp16/bf16 "
                          f"only; use hardware.precision=bf16, or {attn_key}=sdpa")
        elif not _installed("flash_attn"):
            errors.append(f"{attn_key}=flash_attention_2 needs flash-attn: pip install flash-attn --no-build-isolation "
                          f"(or {attn_key}=sdpa)")
    return errors


def _synthetic_errors(cfg: DictConfig) -> list[str]:
    syn, model, phase = cfg.data.synthetic, cfg.model, cfg.phase
    errors = []
    if not 2 <= syn.num_digits <= 12:
        return [f"data.synthetic.num_digits={syn.num_digits}: must be in [2, 12]"]
    if not 0.5 < syn.annotator_agreement < 1:
        errors.append(f"data.synthetic.annotator_agreement={syn.annotator_agreement}: must be in (0.5, 1)")
    if not 1 <= syn.get("num_annotators", 1) <= 50:
        errors.append(f"data.synthetic.num_annotators={syn.num_annotators}: must be in [1, 50]")
    for key in ("sft_habit_fraction", "sft_noise_fraction"):
        if not 0 <= syn[key] <= 1:
            errors.append(f"data.synthetic.{key}={syn[key]}: must be in [0, 1]")
    if syn.sft_habit_fraction + syn.sft_noise_fraction > 1:
        errors.append("data.synthetic.sft_habit_fraction + sft_noise_fraction must be <= 1")
    # held-out prompts are distinct and excluded from training: keep them a small share of all prompts
    most = 10 ** syn.num_digits // 5
    if syn.num_eval_prompts > most:
        errors.append(f"data.synthetic.num_eval_prompts={syn.num_eval_prompts}: at most {most} with "
                      f"num_digits={syn.num_digits} (a fifth of the {10 ** syn.num_digits} possible prompts)")
    # an answer is num_digits tokens plus end of sequence; fewer new tokens would cap the gold score
    if phase.max_new_tokens < syn.num_digits + 1:
        errors.append(f"phase.max_new_tokens={phase.max_new_tokens} cannot hold a {syn.num_digits}-digit answer "
                      f"and its end token: set phase.max_new_tokens={syn.num_digits + 1} or more")
    # bos, prompt, '=', answer, eos (the chat form's length depends on the template: counted when it loads)
    needed = 2 * syn.num_digits + 3
    too_short = phase.max_length < needed or (model.source == "embedded" and model.embedded.max_position_embeddings < needed)
    if syn.form == "plain" and too_short:
        errors.append(f"data.synthetic.num_digits={syn.num_digits} needs sequences of {needed} tokens: raise "
                      f"phase.max_length (and model.embedded.max_position_embeddings) to >= {needed}")
    return errors
