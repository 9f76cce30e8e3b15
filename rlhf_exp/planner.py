"""The dry run's memory and cost planner: what each process holds, per model, and what the run costs.

``python -m rlhf_exp ... dry_run=true`` prints it under the plan (``rlhf_exp.plan``), ending with one
JSON line, so a script or a sweep can refuse a configuration that cannot fit before any GPU is booked.
Nothing is loaded: sizes come from ``model.shape`` (the presets carry their config.json values), from
``model.embedded``, or from a local folder's config.json (and safetensors headers, for the exact count).
Standard library only, so the dry run stays torch-free.

Every function here takes values and returns numbers; the memory model and its hand-checked figures
are written down in docs/planner.md. Bytes throughout; GB = 10^9 bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9
# len(rlhf_exp.models.TINY_VOCAB): models.py imports torch, so the count is repeated here (a test compares)
TINY_VOCAB_SIZE = 15
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "tie_word_embeddings")

# Assumed share of the peak a training/scoring pass achieves (model FLOPs utilisation), and the share HF
# generate() reaches while decoding (memory-bound: every new token reads every weight). Both are guesses
# stated in docs/planner.md; the planner's cost is only as good as they are.
MFU = 0.40
GENERATION_UTILISATION = 0.05
# dense peak TFLOPs per GPU by precision (fp32 = TF32 tensor cores), looked up by the hardware preset's name
PEAK_TFLOPS = {
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp32": 495.0},
}
# per process, outside the tensors counted: CUDA context + cuBLAS/NCCL workspaces; on CPU the imported
# libraries (python + torch + transformers + trl measured ~0.5-0.6 GB RSS, benchmarks/planner_memory.py)
RUNTIME_GB = {"cuda": 1.0, "cpu": 0.6}
# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py) scores SFT and DPO in tiles of this many
# tokens x vocabulary entries instead of materialising [batch, seq, vocab] logits
FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK = 4096, 32768
# hub data sets a dry run does not download: training records per split, from their data set cards
HUB_TRAIN_RECORDS = {
    ("Anthropic/hh-rlhf", None, None, "train"): 160_800,
    ("HuggingFaceH4/ultrafeedback_binarized", None, None, "train_prefs"): 61_135,
    ("HuggingFaceH4/ultrafeedback_binarized", None, None, "train_sft"): 61_135,
}


# ------------------------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Llama / Mistral / Qwen2 layout: GQA attention, gated MLP)."""

    num_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    source: str = "model.shape"

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * (self.hidden_size // self.num_heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, kv, i = self.hidden_size, self.kv_dim, self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.embed_params

    @property
    def linear_params(self) -> int:
        """The decoder layers' projections: what 4-bit/8-bit loading quantizes and LoRA adapts."""
        return self.num_layers * sum(i * o for i, o in self.projections().values())

    @property
    def other_params(self) -> int:
        """Norms and biases: the count less projections, embeddings and LM head."""
        return max(0, self.num_params - self.linear_params - self.embed_params - self.lm_head_params)

    @property
    def layer_params(self) -> float:
        return self.linear_params / self.num_layers + self.other_params / self.num_layers

    def lora_params(self, r: int, targets: tuple[str, ...] = PROJECTIONS) -> int:
        """r * (in + out) per adapted projection, in every layer."""
        return self.num_layers * sum(r * (i + o) for name, (i, o) in self.projections().items() if name in targets)


def count_params(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 vocab_size: int, tie_word_embeddings: bool, qkv_bias: bool = False) -> int:
    """Parameters of a Llama-layout causal LM from its config.json values (Qwen2: qkv_bias=True)."""
    h, kv = hidden_size, num_kv_heads * (hidden_size // num_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * intermediate_size + 2 * h + ((h + 2 * kv) if qkv_bias else 0)
    return num_layers * layer + h + vocab_size * h * (1 if tie_word_embeddings else 2)


def _config_json(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or {}  # multimodal wrappers keep the language model's sizes here
    get = lambda key, default=None: config.get(key, text.get(key, default))  # noqa: E731
    heads = get("num_attention_heads")
    fields: dict[str, Any] = {
        "hidden_size": get("hidden_size"), "num_layers": get("num_hidden_layers"), "num_heads": heads,
        "num_kv_heads": get("num_key_value_heads") or heads, "intermediate_size": get("intermediate_size"),
        "vocab_size": get("vocab_size"), "tie_word_embeddings": get("tie_word_embeddings"),
    }
    counted, has_head = _safetensors_count(folder)
    if fields["tie_word_embeddings"] is None and has_head is not None:
        fields["tie_word_embeddings"] = not has_head
    if counted:
        fields["num_params"] = counted
    fields["_qkv_bias"] = get("model_type") == "qwen2" or bool(get("attention_bias"))
    return {k: v for k, v in fields.items() if v is not None}


def _safetensors_count(folder: Path) -> tuple[int, bool | None]:
    """Exact parameter count from the safetensors headers (8-byte length + JSON), reading no weights."""
    total, has_head = 0, None
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
                has_head = has_head or name.endswith("lm_head.weight")
    if total and has_head is None:
        has_head = False
    return total, has_head


def resolve_shape(model) -> tuple[Shape | None, str]:
    """The model's sizes: model.shape.* as set (presets), completed from model.embedded (the tiny model) or
    from model.path's config.json when it is a local folder. (None, why) when sizes are missing."""
    given = {k: v for k, v in dict(model.shape).items() if v is not None}
    fields, source, qkv_bias = dict(given), "model.shape", False
    if str(model.source) == "embedded":
        arch = model.embedded
        derived = {"hidden_size": arch.hidden_size, "num_layers": arch.num_layers, "num_heads": arch.num_heads,
                   "num_kv_heads": arch.num_heads, "intermediate_size": arch.intermediate_size,
                   "vocab_size": TINY_VOCAB_SIZE, "tie_word_embeddings": True}
        fields, source = {**derived, **given}, "model.embedded"
    elif model.path and Path(str(model.path)).expanduser().is_dir():
        folder = Path(str(model.path)).expanduser()
        if (folder / "config.json").is_file():
            read = _config_json(folder)
            qkv_bias = read.pop("_qkv_bias")
            fields, source = {**read, **given}, f"{folder}/config.json"
    missing = [k for k in SHAPE_FIELDS if k not in fields]
    if missing:
        where = f"model.path={model.path} is not a local folder with a config.json" if model.path else "no model.path"
        keys = "model.shape.* unset" if len(missing) == len(SHAPE_FIELDS) else \
            f"missing {', '.join('model.shape.' + k for k in missing)}"
        return None, (f"sizes of model={model.name} unknown ({where}; {keys}): memory table skipped. Point model.path at "
                      "a local folder, or set model.shape.* from the model's config.json")
    if "num_params" not in fields:
        fields["num_params"] = count_params(**{k: fields[k] for k in SHAPE_FIELDS}, qkv_bias=qkv_bias)
    return Shape(**{k: fields[k] for k in ("num_params", *SHAPE_FIELDS)}, source=source), ""


# ---------------------------------------------------------------------------------------- memory


@dataclass
class ModelMemory:
    """Bytes one process holds for one model (``cpu``: what offload keeps in host RAM instead)."""

    name: str
    role: str
    params: int
    trained_params: int = 0
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    cpu: float = 0.0
    activations: float = 0.0  # the peak of this model's own passes (filled from the stages)
    quantized: bool = False

    @property
    def resident(self) -> float:
        return self.weights + self.gradients + self.optimizer


@dataclass
class _Setup:
    """What the memory model reads from hardware, flattened once."""

    world: int
    c: int  # bytes per value in the compute dtype (bf16/fp16: 2, fp32: 4)
    dist: str
    optimizer_8bit: bool
    quant_rate: float | None  # bytes per quantized linear weight (None: not quantized)
    offload_optimizer: bool
    offload_params: bool
    offload_frozen: bool
    checkpointing: bool
    eager: bool
    lora: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: bool
    cuda: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def shard_all(self) -> bool:  # weights, grads and optimizer states divided by the world size
        return self.dist in ("fsdp", "deepspeed_zero3") and self.world > 1

    @property
    def shard_states(self) -> bool:  # grads and optimizer states divided
        return (self.shard_all or self.dist == "deepspeed_zero2") and self.world > 1

    @property
    def deepspeed(self) -> bool:
        return self.dist.startswith("deepspeed")


def _setup(cfg) -> _Setup:
    hw, model = cfg.hardware, cfg.model
    quant = None
    if hw.load_in_4bit:
        # nf4/fp4: 4 bits per weight plus the quantization constants (one fp32 absmax per 64 weights = 0.5
        # bits; double quantization stores them in 8 bits per 256 = ~0.127 bits)
        quant = (4 + (0.127 if hw.bnb_4bit_use_double_quant else 0.5)) / 8
    elif hw.load_in_8bit:
        quant = 1.0
    targets = tuple(model.lora_target_modules)
    targets = PROJECTIONS if "all-linear" in targets or not set(targets) & set(PROJECTIONS) else \
        tuple(t for t in PROJECTIONS if t in targets)
    attn = model.attn_implementation or hw.attn_implementation or "sdpa"
    return _Setup(world=hw.num_processes * hw.num_nodes, c=4 if str(hw.precision) == "fp32" else 2,
                  dist=str(hw.distributed), optimizer_8bit=str(hw.optimizer) != "adamw_torch", quant_rate=quant,
                  offload_optimizer=hw.offload_optimizer, offload_params=hw.offload_params,
                  offload_frozen=hw.offload_frozen, checkpointing=hw.gradient_checkpointing, eager=attn == "eager",
                  lora=hw.lora, lora_r=hw.lora_r, lora_targets=targets, lora_dropout=hw.lora_dropout > 0,
                  cuda=str(hw.accelerator) == "cuda")


def _frozen_bytes(s: _Setup, shape: Shape, n: int, quantized: bool) -> float:
    """A frozen copy of ``n`` parameters of ``shape``: compute dtype, projections quantized when asked."""
    if quantized and s.quant_rate is not None:
        linear = min(shape.linear_params, n)
        return linear * s.quant_rate + (n - linear) * s.c
    return n * s.c


def trained_model(s: _Setup, name: str, shape: Shape, n: int, head: int = 0, frozen_embeddings: bool = False,
                  lora: bool = False) -> ModelMemory:
    """A model that is trained: whole (16 bytes per parameter with AdamW) or through LoRA adapters (16 bytes per
    adapter parameter; the base frozen, quantized under 4/8-bit). ``head``: parameters trained in full beside
    the adapters (a reward model's or critic's scalar head)."""
    adam = 2 if s.optimizer_8bit else 8
    ds_mixed = s.deepspeed and s.c == 2
    # DeepSpeed under bf16/fp16: 16-bit params 2 + 16-bit grads 2 + (fp32 master 4 + Adam) in its optimizer;
    # otherwise fp32 weights 4 + fp32 grads 4 + Adam (torch autocast computes in 16-bit from the fp32 weights)
    w_b, g_b, o_b = (2, 2, 4 + adam) if ds_mixed else (4, 4, adam)
    if lora:
        trained = shape.lora_params(s.lora_r, s.lora_targets) + head
        frozen = _frozen_bytes(s, shape, n - head, quantized=True)
        w_b, g_b, o_b = 4, 4, adam  # adapters are fp32: no separate master copy
        role = f"trained: LoRA r={s.lora_r}" + (f", {_quant_name(s)} base" if s.quant_rate else f", base {_dtype(s)}")
    else:
        frozen_n = shape.embed_params if frozen_embeddings else 0
        trained = n - frozen_n
        frozen = frozen_n * s.c
        role = f"trained: full, {w_b + g_b + o_b} B/param" + (" (embeddings frozen)" if frozen_embeddings else "")
    wdiv = s.world if s.shard_all else 1
    sdiv = s.world if s.shard_states else 1
    m = ModelMemory(name, role, n, trained, weights=(trained * w_b + frozen) / wdiv, gradients=trained * g_b / sdiv,
                    optimizer=trained * o_b / sdiv, quantized=lora and s.quant_rate is not None)
    if s.dist == "ddp" and s.world > 1:
        m.gradients *= 2  # DDP's all-reduce buckets: about one more copy of the gradients
    _offload(s, m)
    return m


def _offload(s: _Setup, m: ModelMemory) -> None:
    if s.offload_optimizer and s.deepspeed:
        m.cpu, m.optimizer = m.cpu + m.optimizer, 0.0  # Adam states and, under bf16, the fp32 master
    if s.offload_params and s.dist == "deepspeed_zero3":
        m.cpu, m.weights = m.cpu + m.weights, 0.0
    if s.offload_params and s.dist == "fsdp":  # CPUOffloadPolicy: parameters, gradients and optimizer states
        m.cpu += m.resident
        m.weights = m.gradients = m.optimizer = 0.0


def frozen_model(s: _Setup, name: str, shape: Shape, n: int, role: str, offloadable: bool = False) -> ModelMemory:
    """A model only run forward (reference, PPO's reward model): compute dtype (or quantized), sharded under
    ZeRO-3/FSDP, whole otherwise; hardware.offload_frozen keeps it in host RAM between uses (PPO)."""
    weights = _frozen_bytes(s, shape, n, quantized=True) / (s.world if s.shard_all else 1)
    m = ModelMemory(name, f"{role}, {_quant_name(s) if s.quant_rate else _dtype(s)}"
                    + (", sharded" if s.shard_all else ""), n, weights=weights, quantized=s.quant_rate is not None)
    if offloadable and s.offload_frozen:
        m.cpu, m.weights = m.weights, 0.0
        m.role += ", in CPU RAM between uses"
    return m


def _dtype(s: _Setup) -> str:
    return "fp32" if s.c == 4 else "16-bit"


def _quant_name(s: _Setup) -> str:
    return "8-bit" if s.quant_rate == 1.0 else "4-bit"


# ----------------------------------------------------------------------------------- activations


def layer_activations(shape: Shape, tokens: int, seq: int, c: int, eager: bool = False, lora_in: int = 0) -> float:
    """What one decoder layer saves for backward (HF Llama code, sdpa/flash attention): per token, each RMSNorm
    keeps an fp32 copy of its input and its 16-bit normalised output and output (4 + 2c)h, attention keeps q, k,
    v, its output and o_proj's input 3c*h + 2c*kv, the gated MLP gate, silu(gate), up and their product 4c*I.
    Eager attention adds its (4 + c)-byte scores per head and key; LoRA dropout a dropped input and mask
    (c + 1 bytes) per adapted input feature (``lora_in``)."""
    h, kv, i = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    per_token = 2 * (4 + 2 * c) * h + 3 * c * h + 2 * c * kv + 4 * c * i + (c + 1) * lora_in
    return tokens * per_token + (tokens * seq * shape.num_heads * (4 + c) if eager else 0)


def forward_transient(shape: Shape, tokens: int, seq: int, c: int, eager: bool = False) -> float:
    """A forward pass without gradients keeps nothing; its peak is one layer's temporaries: the residual,
    the fp32 norm copy, and the MLP's intermediates."""
    h, i = shape.hidden_size, shape.intermediate_size
    return tokens * (4 * h + 2 * c * h + 3 * c * i) + (tokens * seq * shape.num_heads * (4 + c) if eager else 0)


def head_bytes(shape: Shape, kind: str, tokens: int, c: int, scored: int = 0, trained_head: bool = False,
               cuda: bool = True, kept: int | None = None) -> float:
    """The LM head's memory. ``fused`` (TRL SFT/DPO): a tile buffer of 4096 tokens x 32768 vocabulary entries, an
    fp32 hidden-state gradient and, when the head is trained, an fp32 weight-gradient accumulator (on CPU only the
    tile's columns a small vocabulary writes become resident: torch.empty pages nobody touches cost no RAM).
    ``logits`` (our PPO, ``token_logprobs``): logits in the compute dtype over the ``kept`` positions (the LM head runs
    on each answer's positions and the one before: ``logits_to_keep``; all ``tokens`` when None), then over the
    ``scored`` (answer) positions an fp32 copy, log-softmax and its exp for the entropy. ``scalar``: a reward/value head, ~0."""
    h, v = shape.hidden_size, shape.vocab_size
    if kind == "fused":
        cols = FUSED_VOCAB_CHUNK if cuda else min(v, FUSED_VOCAB_CHUNK)
        return min(tokens, FUSED_TOKEN_CHUNK) * cols * c + tokens * h * 4 + (v * h * 4 if trained_head else 0)
    if kind == "logits":
        return (tokens if kept is None else kept) * v * c + 3 * scored * v * 4
    return 0.0


def train_pass(shape: Shape, s: _Setup, batch: int, seq: int, head: str, scored: int = 0, trained_head: bool = False,
               lora: bool = False) -> float:
    """Activations of one forward+backward on ``batch`` sequences of ``seq`` tokens. Gradient checkpointing keeps
    each layer's 16-bit input and recomputes one layer at a time in the backward."""
    tokens = batch * seq
    lora_in = sum(i for n, (i, _) in shape.projections().items() if n in s.lora_targets) if lora and s.lora_dropout else 0
    layer = layer_activations(shape, tokens, seq, s.c, s.eager, lora_in)
    body = shape.num_layers * tokens * s.c * shape.hidden_size + layer if s.checkpointing else shape.num_layers * layer
    final_norm = tokens * (4 + 2 * s.c) * shape.hidden_size
    return body + final_norm + head_bytes(shape, head, tokens, s.c, batch * scored, trained_head, s.cuda,
                                          kept=batch * (scored + 1) if scored else None)


def forward_pass(shape: Shape, s: _Setup, batch: int, seq: int, head: str, scored: int = 0) -> float:
    kept = batch * (scored + 1) if scored else None
    return (forward_transient(shape, batch * seq, seq, s.c, s.eager)
            + head_bytes(shape, head, batch * seq, s.c, batch * scored, cuda=s.cuda, kept=kept))


def kv_cache(shape: Shape, batch: int, seq: int, c: int) -> float:
    """generate()'s cache: keys and values of every layer for prompt + new tokens."""
    return 2 * shape.num_layers * shape.kv_dim * seq * batch * c


def gathered(s: _Setup, shape: Shape, m: ModelMemory) -> float:
    """ZeRO-3/FSDP gather each layer whole before using it (and prefetch the next): the largest unit (a layer
    or the embedding matrix) plus one layer, in the dtype held (quantized layers stay quantized)."""
    if not s.shard_all or not (m.resident or m.cpu):
        return 0.0
    layer = shape.layer_params * (s.quant_rate if m.quantized and s.quant_rate else s.c)
    return max(layer, shape.embed_params * s.c) + layer


# ----------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """The planner's answer for one composed config."""

    phase: str
    shape: Shape | None
    reason: str = ""
    world: int = 1
    accelerator: str = "cpu"
    models: list[ModelMemory] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {model or "other": bytes}
    runtime: float = 0.0
    device_memory: float | None = None  # bytes available to one process
    device_note: str = ""
    steps: int | None = None
    sequences: int | None = None
    seq_len: int = 0
    tokens: int | None = None
    generated_tokens: int | None = None
    tokens_estimated: bool = False
    flops: float | None = None
    decode_flops: float = 0.0
    peak_flops: float | None = None
    gpu_hours: float | None = None
    cost_usd: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda k: sum(self.stages[k].values())) if self.stages else ""

    @property
    def resident(self) -> float:
        return sum(m.resident for m in self.models)

    @property
    def total(self) -> float:
        peak = sum(self.stages[self.peak_stage].values()) if self.stages else 0.0
        return self.resident + peak + self.runtime

    @property
    def fits(self) -> bool | None:
        if self.shape is None or self.device_memory is None:
            return None
        return self.total <= self.device_memory


def machine_ram_gb() -> float | None:
    """MemTotal of /proc/meminfo in GB (CPU presets leave hardware.device_memory_gb null)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def _phase_models(cfg, s: _Setup, shape: Shape) -> list[ModelMemory]:
    """The models a phase holds. Reward model and critic carry a scalar head instead of the LM head."""
    phase = str(cfg.phase.name)
    scalar = shape.num_params - shape.lm_head_params + shape.hidden_size
    policy = trained_model(s, "policy", shape, shape.num_params, lora=s.lora)
    if phase == "sft":
        return [policy]
    if phase == "dpo":
        ref = ModelMemory("reference", "free: the policy with its adapters off", shape.num_params) if s.lora else \
            frozen_model(s, "reference", shape, shape.num_params, "frozen")
        return [policy, ref]
    if phase == "rm":
        return [trained_model(s, "reward_model", shape, scalar, head=shape.hidden_size, lora=s.lora,
                              frozen_embeddings=bool(cfg.phase.get("freeze_embeddings")) and not s.lora)]
    ref = ModelMemory("reference", "free: the policy with its adapters off", shape.num_params) if s.lora else \
        frozen_model(s, "reference", shape, shape.num_params, "frozen", offloadable=True)
    reward = frozen_model(s, "reward_model", shape, scalar, "frozen", offloadable=True)
    critic_lora = bool(cfg.phase.get("critic_lora"))
    critic = trained_model(s, "critic", shape, scalar + 1, head=shape.hidden_size + 1, lora=critic_lora)
    if not critic_lora and s.quant_rate is not None:
        s.notes.append("the critic is trained whole (phase.critic_lora=false), so 4/8-bit loading does not apply to "
                       "it: phase.critic_lora=true trains adapters on a quantized critic")
    return [policy, ref, reward, critic]


def _stages(cfg, s: _Setup, shape: Shape, models: dict[str, ModelMemory],
            micro_batch: int | None = None) -> dict[str, dict[str, float]]:
    """Transient bytes per stage of a step, per model: the stages run one after another, so the peak is the
    largest stage on top of everything resident. ``micro_batch``: PPO's phase.micro_batch_size, if not as set."""
    ph, phase = cfg.phase, str(cfg.phase.name)
    seq = ph.max_length
    gather = {name: gathered(s, shape, m) for name, m in models.items()}
    full_ft = not s.lora
    if phase in ("sft", "dpo", "rm"):
        per_seq = 1 if phase == "sft" else 2  # preference phases run chosen and rejected together
        batch, eval_batch = ph.per_device_train_batch_size * per_seq, ph.per_device_eval_batch_size * per_seq
        name, head = ("reward_model", "scalar") if phase == "rm" else ("policy", "fused")
        train = {name: train_pass(shape, s, batch, seq, head, trained_head=full_ft, lora=s.lora) + gather[name]}
        evaluation = {name: forward_pass(shape, s, eval_batch, seq, head) + gather[name]}
        if phase != "rm":  # greedy generation for the gold score (embedded task) / eval prompts
            evaluation[name] = max(evaluation[name], kv_cache(shape, ph.per_device_eval_batch_size, seq, s.c)
                                   + forward_transient(shape, ph.per_device_eval_batch_size * seq, seq, s.c) + gather[name])
        if phase == "dpo":  # the reference scores the batch while the policy's activations wait for backward
            train["reference"] = forward_pass(shape, s, batch, seq, head) + gather["reference"]
        return {"training": train, "evaluation": evaluation}
    # PPO: generate, score, update; rollout shares and micro-batches per process (rlhf_exp.ppo.trainer)
    answer = min(ph.max_new_tokens, seq)
    share = max(1, ph.rollout_batch_size // s.world)
    micro_batch = micro_batch or ph.micro_batch_size
    micro = micro_batch or max(1, ph.rollout_batch_size // (ph.num_mini_batches * s.world))
    chunk = micro_batch or share
    generation = {"policy": kv_cache(shape, share, seq, s.c) + forward_transient(shape, share * (seq - answer), seq, s.c)
                  + gather["policy"]}
    scoring: dict[str, float] = {}
    for name in ("policy", "reference", "reward_model", "critic"):
        m = models[name]
        if name == "reference" and not m.resident and not m.cpu:
            continue  # the policy with adapters off: its pass is the policy's
        head = "logits" if name in ("policy", "reference") else "scalar"
        use = forward_pass(shape, s, chunk, seq, head, answer) + gather[name]
        if m.cpu and name in ("reference", "reward_model") and not s.shard_all:
            use += m.cpu  # moved onto the device for its pass
        scoring = scoring if use <= sum(scoring.values()) else {name: use}
    training = {"policy": train_pass(shape, s, micro, seq, "logits", answer, lora=s.lora) + gather["policy"],
                "critic": train_pass(shape, s, micro, seq, "scalar", lora=bool(ph.get("critic_lora"))) + gather["critic"]}
    evaluation = {"policy": kv_cache(shape, ph.per_device_eval_batch_size, seq, s.c) + gather["policy"]
                  + forward_transient(shape, ph.per_device_eval_batch_size * (seq - answer), seq, s.c)}
    return {"generation": generation, "scoring": scoring, "training": training, "evaluation": evaluation}


def _vllm_engine(cfg, shape: Shape, plan: Plan) -> None:
    """phase.rollout_engine=vllm: the engine takes phase.vllm_gpu_memory_utilization of each GPU (its weights, its
    KV cache, its workspace) and the policy no longer generates (its generation stage goes). Held all along, or, with
    phase.vllm_sleep, only while it generates (freed before the update)."""
    ph = cfg.phase
    plan.stages.pop("generation", None)
    if plan.device_memory is None:
        plan.notes.append("phase.rollout_engine=vllm: its share of the GPU (phase.vllm_gpu_memory_utilization) is not "
                          "counted: set hardware.device_memory_gb")
        return
    engine = ph.vllm_gpu_memory_utilization * plan.device_memory
    role = f"vLLM rollout engine, {ph.vllm_gpu_memory_utilization:g} of the GPU"
    if ph.vllm_sleep:
        plan.models.append(ModelMemory("rollout_engine", role + " while generating (vllm_sleep)", shape.num_params,
                                       activations=engine))
        plan.stages["generation"] = {"rollout_engine": engine}
    else:
        plan.models.append(ModelMemory("rollout_engine", role, shape.num_params, weights=engine))


def _device_memory(cfg, s: _Setup, ram_gb: float | None) -> tuple[float | None, str]:
    hw = cfg.hardware
    if hw.device_memory_gb is not None:
        return hw.device_memory_gb * GB, f"{hw.device_memory_gb:g} GB per {'GPU' if str(hw.accelerator) == 'cuda' else 'process'}"
    if str(hw.accelerator) == "cuda":
        return None, "hardware.device_memory_gb is null: set it to check the fit"
    ram = ram_gb if ram_gb is not None else machine_ram_gb()
    if ram is None:
        return None, "the machine's RAM is unknown (no /proc/meminfo): set hardware.device_memory_gb"
    share = hw.num_processes
    return ram * GB / share, f"{ram:.1f} GB RAM" + (f" shared by {share} processes" if share > 1 else "")


# -------------------------------------------------------------------------------------- compute


def _train_records(cfg, records: int | None) -> tuple[int | None, bool]:
    """Training records (pairs for the preference phases): as the dry run counted them; else the embedded task's
    configured sizes; else, for the shipped hub presets, their data set card's count (an estimate); capped by
    data.max_train_samples. (None, True) when nothing says."""
    data, sft = cfg.data, str(cfg.phase.name) == "sft"
    if records is not None:
        return records, False
    if str(data.source) == "synthetic":
        return (data.synthetic.num_sft_train if sft else data.synthetic.num_pref_train), False
    split = data.sft_train_split if sft else data.pref_train_split
    known = HUB_TRAIN_RECORDS.get((data.path, data.subset, data.data_dir, split))
    if known is not None and data.max_train_samples:
        known = min(known, data.max_train_samples)
    return (known if known is not None else data.max_train_samples), True


def _steps(cfg, s: _Setup, records: int | None, prompts: int | None) -> int | None:
    ph = cfg.phase
    if ph.max_steps > 0:
        return ph.max_steps
    if str(ph.name) == "ppo":  # rlhf_exp.runners.ppo: epochs over the unique prompts
        return None if prompts is None else max(1, int(ph.num_epochs * prompts / ph.rollout_batch_size))
    if records is None:
        return None
    # transformers' Trainer: batches per process, then optimizer steps per epoch
    batches = math.ceil(records / (ph.per_device_train_batch_size * s.world))
    return math.ceil(ph.num_epochs * max(math.ceil(batches / ph.gradient_accumulation_steps), 1))


def forward_flops(shape: Shape, seq: int, scalar: bool = False) -> float:
    """FLOPs of one token's forward: 2 per matmul weight (the LM head or a scalar head; embeddings are a
    lookup) plus causal attention's scores and weighted sum, 2*L*seq*h on average over positions."""
    matmul = shape.linear_params + (shape.hidden_size if scalar else shape.embed_params)
    return 2 * matmul + 2 * shape.num_layers * seq * shape.hidden_size


def train_flops(shape: Shape, s: _Setup, seq: int, scalar: bool = False, lora: bool = False) -> float:
    """Forward + backward of one token: 3 forwards when every weight is trained (weight and input gradients),
    2 under LoRA (input gradients only) plus 6 per adapter parameter; one more forward under gradient
    checkpointing (the recomputation: counted, since it takes GPU time)."""
    fwd = forward_flops(shape, seq, scalar)
    if lora:
        return (2 + s.checkpointing) * fwd + 6 * shape.lora_params(s.lora_r, s.lora_targets)
    return (3 + s.checkpointing) * fwd


def _compute(cfg, s: _Setup, shape: Shape, plan: Plan, records: int | None, prompts: int | None) -> None:
    ph, phase = cfg.phase, str(cfg.phase.name)
    seq = plan.seq_len = ph.max_length
    recs, estimated = _train_records(cfg, records)
    if phase == "ppo" and prompts is None and recs is not None:
        prompts = recs  # hub pairs: at most one prompt each
    plan.tokens_estimated = estimated or plan.tokens_estimated
    plan.steps = _steps(cfg, s, recs, prompts)
    if plan.steps is None:
        plan.notes.append("steps unknown (hub data not read and no record count known): set phase.max_steps or "
                          "data.max_train_samples for tokens, GPU-hours and cost")
        return
    if phase == "ppo":
        batch, answer = ph.rollout_batch_size, min(ph.max_new_tokens, seq)
        plan.sequences = plan.steps * batch
        critic_lora = bool(ph.get("critic_lora"))
        policy_fwd, scalar_fwd = forward_flops(shape, seq), forward_flops(shape, seq, scalar=True)
        per_step = batch * (seq - answer) * policy_fwd  # prefill of the prompts
        per_step += batch * seq * (2 * policy_fwd + 2 * scalar_fwd)  # old log-probs, reference, values, rewards
        per_step += ph.ppo_epochs * batch * seq * (train_flops(shape, s, seq, lora=s.lora)
                                                   + train_flops(shape, s, seq, scalar=True, lora=critic_lora))
        plan.flops = plan.steps * per_step
        plan.decode_flops = plan.steps * batch * answer * policy_fwd
        plan.generated_tokens = plan.sequences * answer
    else:
        per_seq = 1 if phase == "sft" else 2
        plan.sequences = plan.steps * ph.per_device_train_batch_size * s.world * ph.gradient_accumulation_steps * per_seq
        per_token = train_flops(shape, s, seq, scalar=phase == "rm", lora=s.lora)
        if phase == "dpo":
            per_token += forward_flops(shape, seq)  # the reference's log-probs (adapters off under LoRA)
        plan.flops = plan.sequences * seq * per_token
    plan.tokens = plan.sequences * seq
    hw = cfg.hardware
    if str(hw.accelerator) == "cpu":
        plan.gpu_hours, plan.cost_usd = 0.0, 0.0
        return
    peak = next((table[str(hw.precision)] for name, table in PEAK_TFLOPS.items() if name in str(hw.name).lower()), None)
    if peak is None:
        plan.notes.append(f"GPU peak unknown for hardware={hw.name} (known: {', '.join(PEAK_TFLOPS)} in the preset's "
                          "name): no GPU-hours or cost")
        return
    plan.peak_flops = peak * 1e12
    seconds = plan.flops / (MFU * plan.peak_flops) + plan.decode_flops / (GENERATION_UTILISATION * plan.peak_flops)
    plan.gpu_hours = seconds / 3600
    plan.cost_usd = plan.gpu_hours * hw.gpu_hour_usd


def estimate(cfg, records: int | None = None, prompts: int | None = None, ram_gb: float | None = None) -> Plan:
    """The plan of a composed config. ``records``: training records (pairs for RM/DPO/PPO) the dry run counted;
    ``prompts``: PPO's unique prompts; ``ram_gb``: the machine's RAM for CPU presets (default: /proc/meminfo)."""
    shape, reason = resolve_shape(cfg.model)
    plan = Plan(str(cfg.phase.name), shape, reason, accelerator=str(cfg.hardware.accelerator))
    if shape is None:
        return plan
    s = _setup(cfg)
    plan.world = s.world
    plan.models = _phase_models(cfg, s, shape)
    plan.stages = _stages(cfg, s, shape, {m.name: m for m in plan.models})
    for m in plan.models:
        m.activations = max((stage.get(m.name, 0.0) for stage in plan.stages.values()), default=0.0)
    plan.runtime = RUNTIME_GB[plan.accelerator] * GB
    plan.device_memory, plan.device_note = _device_memory(cfg, s, ram_gb)
    if plan.phase == "ppo" and str(cfg.phase.get("rollout_engine", "hf")) == "vllm":
        _vllm_engine(cfg, shape, plan)
    _compute(cfg, s, shape, plan, records, prompts)
    plan.notes = s.notes + plan.notes
    hw = cfg.hardware
    if (hw.offload_optimizer or hw.offload_params) and s.dist in ("none", "ddp"):
        plan.notes.append(f"hardware.offload_optimizer/offload_params need ZeRO or FSDP: ignored under distributed={s.dist}")
    if hw.offload_optimizer and s.dist == "fsdp" and not hw.offload_params:
        plan.notes.append("FSDP has no optimizer-only offload: hardware.offload_params=true offloads parameters, "
                          "gradients and optimizer states")
    if plan.phase == "ppo" and plan.fits is False and not cfg.phase.micro_batch_size:
        plan.notes.append(_micro_batch_hint(cfg, s, shape, plan))
    if hw.offload_frozen and plan.phase == "ppo" and not s.shard_all:
        plan.notes.append("offload_frozen: the reference and reward model come onto the device one at a time for "
                          "their scoring pass (counted in the scoring stage)")
    return plan


def _micro_batch_hint(cfg, s: _Setup, shape: Shape, plan: Plan) -> str:
    """PPO with phase.micro_batch_size=null runs a process's whole share in one pass: the largest micro-batch
    (a divisor of the share) that fits, or what the smallest would need."""
    ph = cfg.phase
    share = max(1, ph.rollout_batch_size // (ph.num_mini_batches * s.world))
    models = {m.name: m for m in plan.models}
    for micro in sorted((d for d in range(1, share + 1) if share % d == 0), reverse=True):
        stages = _stages(cfg, s, shape, models, micro_batch=micro)
        total = plan.resident + max(sum(v.values()) for v in stages.values()) + plan.runtime
        if total <= plan.device_memory or micro == 1:
            verdict = "fits" if total <= plan.device_memory else "still does not fit: the resident states alone are " \
                      f"{plan.resident / GB:.1f} GB"
            return (f"phase.micro_batch_size=null runs {share} sequences per pass; phase.micro_batch_size={micro}: "
                    f"{total / GB:.1f} GB, {verdict}")
    return ""


# ------------------------------------------------------------------------------------------ output


def summary(plan: Plan) -> dict[str, Any]:
    """The JSON line: fits, per_gpu_memory_gb (per model and total), gpu_hours, cost_usd, and the rest."""
    gb = lambda x: None if x is None else round(x / GB, 3)  # noqa: E731
    if plan.shape is None:
        return {"fits": None, "per_gpu_memory_gb": None, "gpu_hours": None, "cost_usd": None, "reason": plan.reason}
    per_model = {m.name: gb(m.resident + m.activations) for m in plan.models}
    return {
        "fits": plan.fits,
        "per_gpu_memory_gb": {**per_model, "runtime": gb(plan.runtime), "total": gb(plan.total)},
        "device_memory_gb": gb(plan.device_memory),
        "gpu_hours": None if plan.gpu_hours is None else round(plan.gpu_hours, 3),
        "cost_usd": None if plan.cost_usd is None else round(plan.cost_usd, 2),
        "phase": plan.phase, "processes": plan.world, "peak_stage": plan.peak_stage,
        "breakdown_gb": {m.name: {"weights": gb(m.weights), "gradients": gb(m.gradients), "optimizer": gb(m.optimizer),
                                  "activations": gb(m.activations), "cpu_offload": gb(m.cpu)} for m in plan.models},
        "stages_gb": {k: gb(sum(v.values())) for k, v in plan.stages.items()},
        "params": {m.name: m.params for m in plan.models},
        "trained_params": {m.name: m.trained_params for m in plan.models if m.trained_params},
        "steps": plan.steps, "tokens": plan.tokens, "tokens_estimated": plan.tokens_estimated,
        "generated_tokens": plan.generated_tokens,
        "flops": None if plan.flops is None else float(f"{plan.flops + plan.decode_flops:.4g}"),
        "wall_hours": None if not plan.gpu_hours else round(plan.gpu_hours / plan.world, 3),
        "assumptions": {"mfu": MFU, "generation_utilisation": GENERATION_UTILISATION,
                        "peak_tflops": None if plan.peak_flops is None else plan.peak_flops / 1e12},
        "shape_source": plan.shape.source,
    }


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:g}"


def render(plan: Plan, cfg) -> list[str]:
    """The human-readable lines printed above the JSON line."""
    if plan.shape is None:
        return [f"memory    : {plan.reason}"]
    hw = cfg.hardware
    where = "GPU" if plan.accelerator == "cuda" else "CPU process"
    lines = [f"memory    : per {where} ({plan.world} process(es), {hw.distributed}, {hw.precision}); "
             f"{_n(plan.shape.num_params)} parameters from {plan.shape.source}; GB = 1e9 bytes"]
    f = lambda x: f"{x / GB:8.2f}" if x else "       -"  # noqa: E731
    lines.append(f"  {'model':<13}{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} {'CPU':>8}  role")
    for m in plan.models:
        lines.append(f"  {m.name:<13}{f(m.weights)} {f(m.gradients)} {f(m.optimizer)} {f(m.activations)} "
                     f"{f(m.resident + m.activations)} {f(m.cpu)}  {m.role} ({_n(m.params)} params"
                     + (f", {_n(m.trained_params)} trained)" if m.trained_params else ")"))
    runtime = "CUDA context, workspaces" if plan.accelerator == "cuda" else "python + torch + transformers + trl"
    lines.append(f"  {'runtime':<13}{'':>44}{f(plan.runtime)}{'':>9}  {runtime}")
    stages = ", ".join(f"{k} {sum(v.values()) / GB:.2f}" for k, v in plan.stages.items())
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit not checked"}[plan.fits]
    room = f" of {plan.device_memory / GB:.1f} GB ({plan.device_note})" if plan.device_memory else f" ({plan.device_note})"
    lines.append(f"  total        {plan.total / GB:.2f} GB{room}: {verdict} "
                 f"(resident {plan.resident / GB:.2f} + peak stage {plan.peak_stage} "
                 f"{sum(plan.stages[plan.peak_stage].values()) / GB:.2f} + runtime {plan.runtime / GB:.2f})")
    lines.append(f"stages    : GB on top of the resident states, one stage at a time: {stages}")
    if plan.tokens is not None:
        est = " (record count estimated: hub data not read)" if plan.tokens_estimated else ""
        gen = f", {_n(plan.generated_tokens)} of them generated" if plan.generated_tokens else ""
        lines.append(f"tokens    : {plan.steps:,} steps x {plan.sequences // plan.steps:,} sequences x {plan.seq_len} "
                     f"tokens (phase.max_length, an upper bound) = {_n(plan.tokens)} tokens{gen}{est}; "
                     f"{plan.flops + plan.decode_flops:.3g} FLOPs")
    if plan.gpu_hours is not None and plan.accelerator == "cuda":
        cost = f"{plan.cost_usd:,.0f}" if plan.cost_usd >= 100 else f"{plan.cost_usd:.2f}"
        lines.append(f"cost      : {plan.gpu_hours:,.2f} GPU-hours ({plan.gpu_hours / plan.world:,.2f} h wall on "
                     f"{plan.world} GPUs) x ${hw.gpu_hour_usd:g} = ${cost}; at {MFU:.0%} of "
                     f"{plan.peak_flops / 1e12:g} TFLOPs peak"
                     + (f", generation at {GENERATION_UTILISATION:.0%}" if plan.decode_flops else "")
                     + ("; early stopping can end sooner" if plan.phase != "ppo" and cfg.phase.early_stopping_patience
                        else ""))
    elif plan.accelerator == "cpu":
        lines.append("cost      : CPU run: GPU-hours do not apply ($0)")
    lines += [f"note      : {n}" for n in plan.notes]
    return lines


def print_estimate(cfg, records: int | None = None, prompts: int | None = None) -> dict[str, Any]:
    """Print the memory table; returns the JSON summary, which the dry run prints as its last line."""
    plan = estimate(cfg, records, prompts)
    for line in render(plan, cfg):
        print(line)
    return summary(plan)
