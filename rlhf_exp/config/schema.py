"""The config schema: every key a run accepts, its type and its default.

Each default is written once, here. YAML files under ``conf/`` only set values
(each starts with ``defaults: [base_<group>]``), so a misspelled key or a value
of the wrong type fails when Hydra composes, before anything heavy is imported.

This module imports nothing but the standard library, OmegaConf and Hydra: the
CLI's ``--help``/``--cfg`` path goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf

# Choices are StrEnums: OmegaConf rejects any other value at compose time, listing the valid ones,
# and a member formats and compares as its plain string ("bf16").


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Distributed(StrEnum):
    # single process (CPU or one GPU)
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"


class Accelerator(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class KLControl(StrEnum):
    fixed = "fixed"
    adaptive = "adaptive"


class KLEstimator(StrEnum):
    k1 = "k1"
    k3 = "k3"


class RolloutLogprobs(StrEnum):
    auto = "auto"
    generate = "generate"
    forward = "forward"


class RolloutEngine(StrEnum):
    hf = "hf"
    vllm = "vllm"


class GenerationCache(StrEnum):
    dynamic = "dynamic"
    static = "static"


class ModelSource(StrEnum):
    # built locally from model.embedded
    embedded = "embedded"
    # from_pretrained(model.path): a hub id or a local folder
    hub = "hub"


class DataSource(StrEnum):
    synthetic = "synthetic"
    hub = "hub"
    jsonl = "jsonl"


class DataFormat(StrEnum):
    # pick from the columns present (local files)
    auto = "auto"
    # Anthropic HH: chosen/rejected are whole "Human: ... Assistant: ..." transcripts
    hh = "hh"
    # prompt + chosen + rejected (strings or chat lists)
    preference = "preference"
    # one chat list per record (SFT only)
    messages = "messages"
    # prompt + completion (SFT only)
    prompt_completion = "prompt_completion"


class TaskForm(StrEnum):
    # "3 1 4 1 5 =" -> " 1 1 3 4 5": plain strings, for the embedded 15-token tokenizer (and any other)
    plain = "plain"
    # the same task as chat messages ("Sort these digits: 3 1 4 1 5" -> "1 1 3 4 5"), rendered by the
    # model's chat template: the real-tokenizer, real-template path with a gold score
    chat = "chat"


class DType(StrEnum):
    # as stored in the checkpoint, unless hardware.precision asks for bf16/fp16/fp32
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LRScheduler(StrEnum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class DPOLoss(StrEnum):
    # TRL 1.16 DPOTrainer's loss types; sigmoid is the DPO paper's
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


class Optimizer(StrEnum):
    # torch.optim.AdamW (fp32 states: 8 bytes per trained parameter)
    adamw_torch = "adamw_torch"
    # bitsandbytes AdamW8bit (2 bytes per trained parameter; pip install -e '.[quant]')
    adamw_8bit = "adamw_8bit"
    # bitsandbytes PagedAdamW8bit: states page out to CPU RAM under GPU memory pressure
    paged_adamw_8bit = "paged_adamw_8bit"


class QuantType(StrEnum):
    nf4 = "nf4"
    fp4 = "fp4"


class LoggerName(StrEnum):
    local = "local"
    wandb = "wandb"


class LauncherName(StrEnum):
    # jobs run here, one after another (Hydra's basic launcher)
    local = "local"
    # submitit's local executor: the SLURM code path without a cluster (tests, debugging)
    submitit_local = "submitit_local"
    # sweep jobs here, launcher.parallel_jobs at once (submitit's local executor, jobs started in batches)
    parallel = "parallel"
    # one SLURM job per sweep point through hydra-submitit-launcher
    slurm = "slurm"


class ArtifactMode(StrEnum):
    reference = "reference"
    upload = "upload"


class WandbMode(StrEnum):
    # online when an API key is available, otherwise offline
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --------------------------------------------------------------------------- model


@dataclass
class EmbeddedArch:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 32
    # seed of the initial weights (the model is rebuilt identically from it)
    init_seed: int = 0


@dataclass
class ModelShape:
    """What the planner (``dry_run=true``) needs to size a model without downloading it: presets fill these
    from the model's config.json; null fields are read from model.path's config.json when it is a local
    folder, or derived from model.embedded for the embedded model."""

    # total parameters of the causal LM (embeddings and LM head included)
    num_params: Optional[int] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None


@dataclass
class ModelConfig:
    # preset name; recorded in manifests and used to match parent runs
    name: str = MISSING
    source: ModelSource = ModelSource.hub
    # hub id (org/name) or a local folder saved with save_pretrained; unused when source=embedded
    path: Optional[str] = None
    # hub revision (branch, tag or commit) to pin
    revision: Optional[str] = None
    # weights dtype when loading
    dtype: DType = DType.auto
    # null: the tokenizer's own chat template; "chatml" (rlhf_exp/templates/chatml.jinja) or a path to
    # a .jinja file, for base models whose tokenizer has none
    chat_template: Optional[str] = None
    # attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2); null = library default
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    # the token that ends an answer, when the chat template ends turns with another token than the
    # tokenizer's EOS (Llama 3.1 base: <|eot_id|>); null: the tokenizer's own
    eos_token: Optional[str] = None
    # modules LoRA adapts when hardware.lora=true; "all-linear" lets peft pick every linear layer
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # architecture of the embedded model (source=embedded only)
    embedded: EmbeddedArch = field(default_factory=lambda: EmbeddedArch())
    # sizes for the planner (dry_run=true); nothing is downloaded to plan
    shape: ModelShape = field(default_factory=ModelShape)


# ---------------------------------------------------------------------------- data


@dataclass
class ColumnMap:
    # names of the source columns holding each field; null = not present in this data set
    prompt: Optional[str] = "prompt"
    completion: Optional[str] = "completion"
    chosen: Optional[str] = "chosen"
    rejected: Optional[str] = "rejected"
    messages: Optional[str] = "messages"


@dataclass
class SyntheticTask:
    # plain: "3 1 4 1 5 =" -> " 1 1 3 4 5" (strings); chat: user/assistant messages in words, for models
    # with a real tokenizer and chat template (data=synthetic_chat)
    form: TaskForm = TaskForm.plain
    # digits in each prompt; the answer is the same digits sorted ascending
    num_digits: int = 5
    # SFT demonstrations
    num_sft_train: int = 4096
    num_sft_eval: int = 256
    # fraction of demonstrations with the demonstrators' consistent habit (last two answer digits
    # swapped): imitation copies it, preferences can remove it (see docs in rlhf_exp/data/synthetic.py)
    sft_habit_fraction: float = 0.6
    # fraction with 1-2 random corruptions; random mistakes never form a mode, so greedy SFT ignores them
    sft_noise_fraction: float = 0.0
    # preference pairs labelled by simulated annotators
    num_pref_train: int = 4000
    num_pref_eval: int = 500
    # probability that an annotator's choice agrees with the gold ranking (InstructGPT reports ~72%)
    annotator_agreement: float = 0.72
    # simulated annotators labelling each pair (n > 1: every pair carries n labels for agreement statistics,
    # python -m rlhf_exp.data check; the training label stays the first annotator's, so the data trained on
    # do not change with n)
    num_annotators: int = 1
    # drop pairs whose two answers have equal gold (annotators pick at random on them)
    drop_ties: bool = True
    # held-out prompts scored with the gold reward (greedy decoding) after each policy phase
    num_eval_prompts: int = 500


@dataclass
class DataConfig:
    # preset name; recorded in manifests and used to match parent runs
    name: str = MISSING
    # synthetic: the embedded task; hub: datasets.load_dataset(path); jsonl: local files
    source: DataSource = MISSING
    # hub id of the data set (source=hub)
    path: Optional[str] = None
    # hub config/subset name, or data_dir for hub data sets that use folders (e.g. hh-rlhf's harmless-base)
    subset: Optional[str] = None
    data_dir: Optional[str] = None
    revision: Optional[str] = None
    # layout of the records
    format: DataFormat = DataFormat.auto
    # splits used by SFT and by the preference phases (RM, DPO, PPO prompts)
    sft_train_split: str = "train"
    sft_eval_split: Optional[str] = "test"
    pref_train_split: str = "train"
    pref_eval_split: Optional[str] = "test"
    # local files (source=jsonl); eval_file null = hold out eval_fraction of train_file
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_fraction: float = 0.05
    columns: ColumnMap = field(default_factory=ColumnMap)
    # cap on examples per split (null = all): quick trials on big sets
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # seed of data generation, shuffling and the held-out split
    seed: int = 0
    synthetic: SyntheticTask = field(default_factory=SyntheticTask)


# --------------------------------------------------------------------------- phase


@dataclass
class PhaseConfig:
    # sft | rm | ppo | dpo: picks the runner
    name: str = MISSING
    learning_rate: float = 2e-5
    # learning rate when hardware.lora=true (adapters want ~10x a full fine-tune's rate; alignment-handbook's
    # LoRA/QLoRA recipes: SFT 2e-4, DPO 5e-6); null: phase.learning_rate
    lora_learning_rate: Optional[float] = 2e-4
    # passes over the training set; max_steps > 0 overrides it
    num_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: LRScheduler = LRScheduler.cosine
    max_grad_norm: float = 1.0
    # tokens per sequence (prompt + answer); longer ones are truncated
    max_length: int = 1024
    logging_steps: int = 10
    # evaluate every `eval_steps` steps; null = once per epoch
    eval_steps: Optional[int] = None
    # stop after this many evaluations without improvement; 0 = never stop early
    early_stopping_patience: int = 2
    # a resumable checkpoint (weights, optimizer, scheduler, RNG states, data position; PPO: both models,
    # both optimizers, KL controller, sampling state) every N steps; null: none by step count
    save_steps: Optional[int] = None
    # ... and every M minutes (also saved when SIGTERM/SIGUSR2 arrives); null with save_steps null: no
    # resumable checkpoints at all (a killed run starts over, a stop signal just stops)
    save_minutes: Optional[float] = 30.0
    # resumable checkpoints kept while training: the newest N plus the best one by the phase's metric
    # (eval metric; PPO: rollout reward); after success only the best is kept, when it is not the final model
    keep_checkpoints: int = 2
    # NaN/inf gradients are never applied; this many such batches are skipped (update dropped, logged as
    # train/skipped_batches) before the run stops with the last good state saved
    skip_nonfinite_batches: int = 0
    # sampling settings for the gold-score evaluation and PPO rollouts
    max_new_tokens: int = 256


@dataclass
class SFTPhaseConfig(PhaseConfig):
    name: str = "sft"
    # loss on the answer tokens only (the prompt is context, not a target)
    completion_only_loss: bool = True
    # pack several short examples into one sequence (real data; off for the embedded task)
    packing: bool = False


@dataclass
class DPOPhaseConfig(PhaseConfig):
    name: str = "dpo"
    learning_rate: float = 5e-7
    lora_learning_rate: Optional[float] = 5e-6
    # strength of the implicit KL constraint to the reference (the SFT model)
    beta: float = 0.1
    # DPO loss variant passed to TRL
    loss_type: DPOLoss = DPOLoss.sigmoid
    # SFT run to start from: a run folder or run id; null = latest successful SFT run of the
    # same model and data under output_root
    sft_run: Optional[str] = None
    # phase.eval_steps (above; null: every epoch): greedy answers to this many held-out prompts give eval/* in
    # metrics.jsonl (gold, KL to the reference, length, policy entropy, distinct-1/2; rlhf_exp.heldout); 0: off
    eval_num_prompts: int = 64
    # ... and self-BLEU (eval/self_bleu) over this many answers sampled per prompt (0 or 1: none)
    eval_samples: int = 4


@dataclass
class RMPhaseConfig(PhaseConfig):
    name: str = "rm"
    learning_rate: float = 1e-5
    # TRL's reward-modelling example: 1e-5 full, 1e-4 with LoRA
    lora_learning_rate: Optional[float] = 1e-4
    # keep the token embeddings fixed while training the reward head and body
    freeze_embeddings: bool = True
    sft_run: Optional[str] = None


@dataclass
class PPOPhaseConfig(PhaseConfig):
    name: str = "ppo"
    learning_rate: float = 1e-6
    lora_learning_rate: Optional[float] = 1e-5
    sft_run: Optional[str] = None
    reward_run: Optional[str] = None
    # accept a reward_run that was not trained from sft_run (its manifest's SFT parent is another run);
    # by default such a pair is refused (see docs/lineage.md)
    allow_foreign_reward_model: bool = False
    # KL penalty coefficient (with kl_ctrl=adaptive, its starting value)
    kl_coef: float = 0.2
    kl_ctrl: KLControl = KLControl.adaptive
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: KLEstimator = KLEstimator.k1
    # stop a step's PPO epochs when the update's approximate KL exceeds 1.5 * target_kl; null = never
    target_kl: Optional[float] = None
    ppo_epochs: int = 4
    # prompts sampled per PPO step, over all processes (each generates rollout_batch_size / processes)
    rollout_batch_size: int = 64
    # each PPO epoch splits the rollout batch into this many mini-batches, one optimizer step each (every
    # process takes rollout_batch_size / num_mini_batches / processes sequences of each)
    num_mini_batches: int = 1
    # sequences per forward/backward pass on one process (OpenRLHF's micro_train_batch_size default): a process's
    # share of a mini-batch runs in micro-batches of this size with gradients accumulated (one optimizer step per
    # mini-batch, the same update as one pass); rollout scoring (log-probs, values, rewards) runs in chunks of it
    # too. A share smaller than this runs in one pass; null: always the whole share in one pass
    micro_batch_size: Optional[int] = 8
    # the critic's learning rate (OpenRLHF's defaults: actor 1e-6 (5e-7 in its 7B recipes), critic 9e-6, ~10x
    # the policy's: a freshly initialised value head has far to go); the same rate with phase.critic_lora
    critic_learning_rate: float = 9e-6
    # train LoRA adapters (hardware.lora_r/alpha) on the critic's body, plus its value head in full; follows
    # hardware.lora unless set (a LoRA/QLoRA run has no room for a fully trained 7-8B critic: 16 bytes/param)
    critic_lora: bool = II("hardware.lora")
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    # rollouts sample from softmax(logits / temperature); the log-probabilities use the same temperature
    temperature: float = 1.0
    # where the rollout's log-probabilities (PPO's old policy) and entropies come from: generate = the logits the
    # sampler drew each token from (no extra forward of the policy); forward = a forward of the policy over prompt
    # and answer after generating; auto = generate when the policy computes in full fp32 (measured: the two agree to
    # 1e-6, the first update's ratio is 1 +- 1e-6) and is not quantized, else forward (in bf16 they differ by up to
    # 7.5e-3: a ratio that is not 1 before any update; benchmarks/ppo_choices.py)
    rollout_logprobs: RolloutLogprobs = RolloutLogprobs.auto
    # what generates the rollouts (docs/ppo-at-scale.md): hf = the policy's own generate() (any hardware, exact
    # log-probabilities from the sampler); vllm = a vLLM engine in each process (CUDA only, `pip install
    # rlhf_exp[vllm]`), the policy's weights loaded into it before each rollout after an update (LoRA adapters
    # merged in on the way), the answers' log-probabilities recomputed by a forward of the trained policy
    rollout_engine: RolloutEngine = RolloutEngine.hf
    # hf: the KV cache of generate(): dynamic grows with the answer; static is allocated once for prompt +
    # max_new_tokens (fixed shapes: what compile_generation needs)
    generation_cache: GenerationCache = GenerationCache.dynamic
    # hf with generation_cache=static: torch.compile the decoding step (transformers' CompileConfig; CUDA graphs
    # on a GPU). The first rollout pays the compilation
    compile_generation: bool = False
    # vllm: the share of the GPU's memory the engine takes for its weights and KV cache (beside the training state)
    vllm_gpu_memory_utilization: float = 0.3
    # vllm: the engine frees its weights and KV cache between rollouts (vLLM sleep mode, level 2) and receives the
    # weights again before the next: memory for the update at the cost of a weight load per step
    vllm_sleep: bool = False
    # must stay 1.0: a nucleus cut under the rollout policy is not part of the log-probabilities PPO's
    # ratio uses (refused by validate, with the reason)
    top_p: float = 1.0
    length_penalty: float = 0.0
    missing_eos_penalty: Optional[float] = None
    normalize_reward: bool = True
    reward_clip: Optional[float] = 10.0
    # phase.eval_steps (above): every N steps (and at the last) greedy answers to this many held-out prompts give
    # eval/* in metrics.jsonl (gold, RM score, KL to the reference, length, entropy, distinct-1/2)
    eval_num_prompts: int = 64
    # ... and self-BLEU (eval/self_bleu) over this many answers sampled per prompt at phase.temperature (0 or 1: none)
    eval_samples: int = 4
    # the checkpoint kept as "best" follows held-out gold where a gold reward exists, else the held-out RM score
    # among evaluations whose held-out KL is at most this (null: 2 x kl_target); only checkpoints saved at an
    # evaluated step take part (align phase.save_steps with phase.eval_steps)
    best_kl_max: Optional[float] = None


# ------------------------------------------------------------------------ hardware


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: Accelerator = Accelerator.cpu
    gpus_per_node: int = 0
    # processes per node (one per GPU on GPU presets)
    num_processes: int = 1
    num_nodes: int = 1
    precision: Precision = Precision.fp32
    distributed: Distributed = Distributed.none
    # train LoRA adapters instead of all weights; also makes the frozen reference free
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    # dataloader worker processes
    num_workers: int = 0
    # optimizer of whatever is trained (adamw_8bit / paged_adamw_8bit: bitsandbytes)
    optimizer: Optimizer = Optimizer.adamw_torch
    # quantized frozen base weights (bitsandbytes; needs hardware.lora=true: QLoRA). 4-bit: nf4 or fp4,
    # double quantization, compute dtype = hardware.precision's; 8-bit: LLM.int8
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = True
    # attention kernel: null picks flash_attention_2 on CUDA when flash-attn is installed (else sdpa, with
    # one line saying so), sdpa on CPU; model.attn_implementation, when set, wins
    attn_implementation: Optional[str] = None
    # DeepSpeed ZeRO: optimizer states (stage 2/3) and parameters (stage 3) offloaded to CPU RAM;
    # FSDP: offload_params moves parameters, gradients and optimizer states to CPU (CPUOffloadPolicy)
    offload_optimizer: bool = False
    offload_params: bool = False
    # PPO: the frozen reference and reward model wait in CPU RAM between uses (DDP/single process), or
    # are sharded with their parameters offloaded (ZeRO-3 / FSDP)
    offload_frozen: bool = False
    # memory of one device in GB (GPU memory on CUDA presets; null on CPU: the machine's RAM), for the planner
    device_memory_gb: Optional[float] = None
    # price of one GPU-hour in US dollars, for the planner's cost line (A100 80GB on-demand: ~$32.8/h for 8)
    gpu_hour_usd: float = 4.10
    # SLURM sizing of each task (one per process): CPUs (sbatch --cpus-per-task) and host memory per node
    # in GB (sbatch --mem); null: launcher.cpus_per_task / launcher.mem_gb, else the cluster's default
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None


# -------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    # local: metrics.jsonl/summary.json only; wandb: the same, plus Weights & Biases
    name: LoggerName = LoggerName.local
    # W&B settings (logger=wandb)
    project: str = "rlhf_exp"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    # W&B group; null: the sweep's name (sweep=<name>) or folder for a sweep job, the pipeline's folder for a
    # pipeline's phase, none for a single run (docs/wandb.md)
    group: Optional[str] = None
    # log the final checkpoint as a W&B artifact <phase>-<run id> with its lineage (parents, config hash, metrics)
    log_artifacts: bool = False
    # reference: a file:// reference to the checkpoint folder (checksums only, nothing copied or uploaded);
    # upload: its files are uploaded to W&B
    artifact_mode: ArtifactMode = ArtifactMode.reference


# ------------------------------------------------------------------------ launcher


@dataclass
class LauncherConfig:
    """Where jobs run. Nodes, GPUs and tasks per node come from ``hardware`` (one task per GPU);
    conf/launcher/*.yaml maps these fields onto hydra-submitit-launcher (``--cfg hydra`` shows it).
    Site defaults (partition, account, setup) go in the git-ignored conf/site/local.yaml."""

    name: LauncherName = MISSING
    # SLURM partition, account and QOS (sbatch -p / -A / -q)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # job time limit in minutes (sbatch -t)
    time_min: int = 60
    cpus_per_task: Optional[int] = None
    # memory per node in GB (sbatch --mem)
    mem_gb: Optional[int] = None
    # node features (sbatch -C), e.g. "a100&80gb"
    constraint: Optional[str] = None
    # any other sbatch flag without its dashes, e.g. {"mail-type": "END", "exclusive": true}
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # most sweep jobs running at once (the job array's %N)
    array_parallelism: int = 256
    # shell lines run in the sbatch script before the job starts (module load, conda activate)
    setup: list[str] = field(default_factory=list)
    # seconds before the time limit at which SLURM sends USR2: the job saves a checkpoint at the end of
    # its current step and requeues itself (allow for one step plus one save)
    signal_delay_s: int = 120
    # how many times a job that reaches its time limit is requeued to continue from its checkpoint
    # (preempted jobs are always requeued); 0: a job at its time limit saves and stops
    max_num_timeout: int = 3
    # launcher=slurm: minutes the command waits for its job (a sweep's first job) to leave the queue before
    # cancelling it (exit 2); null: wait as long as it takes. A reason that waiting cannot clear
    # (PartitionTimeLimit, a QOS per-job limit, ...) is cancelled at once either way (docs/slurm-sizing.md)
    pending_timeout_min: Optional[float] = None
    # launcher=parallel: sweep jobs run at once on this machine (null: one per usable CPU core); the CPUs are
    # split between them (each job's thread rule sees its share)
    parallel_jobs: Optional[int] = None


# ------------------------------------------------------------------------ pipeline


@dataclass
class PipelineConfig:
    name: str = MISSING
    # phases run in order, each in <pipeline folder>/<phase>/, children pointed at their parents there
    phases: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo", "dpo"])
    # per-phase settings, e.g. pipeline.ppo.kl_coef=0.1 (checked against that phase's schema)
    sft: dict[str, Any] = field(default_factory=dict)
    rm: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    # on CPU hardware: import torch/transformers/TRL once in a helper process and fork each phase from it (each phase
    # still its own process and run folder), instead of paying the ~7 s import in every phase; false: a fresh process
    # per phase (always on GPU hardware)
    preload: bool = True


class OnAlarm(StrEnum):
    warn = "warn"
    checkpoint = "checkpoint"
    stop = "stop"


@dataclass
class MonitorConfig:
    """Health monitor of PPO and DPO (rlhf_exp.monitor; docs/monitor.md has the numbers behind the defaults)."""

    enabled: bool = True
    # what an alarm does: warn (a line on stderr, summary.json, a W&B alert), checkpoint (also saves a
    # resumable checkpoint at that step, then continues), stop (saves one when checkpoints are on, then ends
    # the run cleanly: the policy of that step is the final one, the reason in summary.json and manifest.json)
    on_alarm: OnAlarm = OnAlarm.warn
    # steps per moving window; rules compare the last window with the first
    window: int = 10
    # steps before the collapse and growth rules may fire
    warmup_steps: int = 20
    # KL runaway: window mean of ppo/kl above this many nats (null: 3 x phase.kl_target)
    kl_max: Optional[float] = None
    # KL collapse: window mean of ppo/kl below this after warmup (null: off)
    kl_min: Optional[float] = 0.01
    # length hacking: window mean length at least this many times the first window's (null: off)
    length_growth: Optional[float] = 1.2
    # length hacking: window mean of the within-batch length-reward correlation at least this ...
    length_reward_corr: Optional[float] = 0.25
    # ... and up by at least this since the first window
    corr_rise: float = 0.2
    # entropy collapse: window mean entropy at most this fraction of the first window's (null: off) ...
    entropy_drop: Optional[float] = 0.3
    # ... or below this many nats (null: off)
    entropy_min: Optional[float] = None
    # repetition: held-out distinct-1/2 down by this fraction from their best evaluation (null: off)
    distinct_drop: Optional[float] = 0.3
    # repetition: held-out self-BLEU closed this fraction of the gap between its lowest evaluation and 1 (identical
    # samples), e.g. 0.3 -> 0.65 (null: off)
    self_bleu_rise: Optional[float] = 0.5
    # over-optimisation: gold (held-out eval/gold, or windows of ppo/gold_reward) down this much from its best
    # while the reward model's score did not fall (null: off)
    gold_drop: Optional[float] = 0.05


# ---------------------------------------------------------------------------- root


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    phase: PhaseConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # PPO's health monitor (KL band, length hacking, entropy collapse, repetition, gold vs proxy): docs/monitor.md
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # pipeline=rlhf runs several phases in one command (null: a single phase)
    pipeline: Optional[PipelineConfig] = None
    # seed of model init, data order and sampling for this run
    seed: int = 0
    # where runs live; parent runs (phase.sft_run=null) are looked up here
    output_root: str = "outputs"
    # free-form label recorded in the manifest
    tag: Optional[str] = None
    # compose, check and print the resolved plan without loading anything
    dry_run: bool = False
    # auto: a run launched into a folder that already holds it (a requeued SLURM job, or
    # `python -m rlhf_exp resume=<run folder>`) continues from its latest complete checkpoint;
    # never: such a launch is refused
    resume: str = "auto"


PHASE_SCHEMAS: dict[str, type[PhaseConfig]] = {
    "sft": SFTPhaseConfig,
    "rm": RMPhaseConfig,
    "ppo": PPOPhaseConfig,
    "dpo": DPOPhaseConfig,
}

GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "hardware": HardwareConfig,
    "logger": LoggerConfig,
    "launcher": LauncherConfig,
    "pipeline": PipelineConfig,
}


def _parallel_jobs(jobs) -> int:
    from rlhf_exp.launch.threads import usable_cpus

    return max(1, int(jobs)) if jobs is not None else usable_cpus(share=False)


def register_configs() -> None:
    """Register every schema so YAML files can start with ``defaults: [base_<group>]``."""
    cs = ConfigStore.instance()
    # the job script's setup lines: srun stops every task of a job as soon as one fails (a failed rank
    # would otherwise leave the others waiting in a collective), then the user's own lines
    OmegaConf.register_new_resolver("rlhf_exp_srun_setup", lambda lines: ["export SLURM_KILL_BAD_EXIT=1", *(lines or [])],
                                    replace=True)
    # launcher=parallel: how many sweep jobs run at once (launcher.parallel_jobs, null: the usable CPU cores)
    OmegaConf.register_new_resolver("rlhf_exp_parallel_jobs", _parallel_jobs, replace=True)
    cs.store(name="base_config", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    for name, schema in PHASE_SCHEMAS.items():
        cs.store(group="phase", name=f"base_{name}", node=schema)


def learning_rate(phase, hardware) -> float:
    """The rate training uses: phase.lora_learning_rate under hardware.lora (when set), else learning_rate."""
    if hardware.lora and phase.lora_learning_rate is not None:
        return phase.lora_learning_rate
    return phase.learning_rate


def resumable_checkpoints(phase) -> bool:
    """Whether the phase writes resumable checkpoints (by steps, by minutes, or on a stop signal)."""
    return phase.save_steps is not None or phase.save_minutes is not None

