"""How PPO holds and steps its four models, one backend per ``hardware.distributed``.

PPO trains two models (policy, critic) and runs two frozen ones (reference, reward model). The trainer
(``rlhf_exp.ppo.trainer``) only calls the small interface of :class:`Backend`; each backend decides where
the weights live and how gradients meet:

- :class:`Accelerated` (``none`` / ``ddp``): accelerate places the trained models and wraps them for DDP;
  mixed precision is autocast over fp32 weights (accelerate's ``mixed_precision``). Frozen models are
  whole on each device, or wait in CPU RAM between uses with ``hardware.offload_frozen``.
- :class:`FSDP` (``fsdp``): FSDP2 ``fully_shard`` on each decoder layer and on the model, for all four
  models. Trained weights stay fp32 (the master copy) and compute in bf16/fp16 through FSDP's
  ``MixedPrecisionPolicy``; ``offload_params`` / ``offload_frozen`` put shards in CPU RAM.
- :class:`DeepSpeed` (``deepspeed_zero2`` / ``deepspeed_zero3``): one DeepSpeed engine per trained model
  (its bf16 optimizer keeps fp32 master weights); under ZeRO-3 the frozen models get inference engines
  (sharded, ``offload_frozen`` puts their shards in CPU RAM). Models load partitioned
  (``zero.Init`` through transformers' ``HfDeepSpeedConfig``, kept alive by :func:`loading_context`).

Generation under FSDP/ZeRO-3 never gathers a whole model on one device: each layer's weights are gathered
as the forward reaches them and freed after (``synced_gpus=True``: a process whose answers ended keeps
stepping until every process is done, so all take part in every gather). Slower than generating from
gathered weights; it costs no memory beyond one layer.

The settings themselves (ZeRO sections, precision) come from ``rlhf_exp.launch.sharding``, and the ones
a run used are written into its folder (``launch/deepspeed.json`` / ``launch/fsdp.json``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rlhf_exp.launch import sharding
from rlhf_exp.models import broadcast_loading, broadcasts, load_from_rank0, save_gathered


def backend_for(hardware) -> type[Backend]:
    kind = str(hardware.distributed)
    if kind == "fsdp":
        return FSDP
    if kind.startswith("deepspeed"):
        return DeepSpeed
    return Accelerated


def micro_batches(phase, world: int) -> tuple[int, int]:
    """(sequences per forward/backward on one process, micro-batches per mini-batch)."""
    share = phase.rollout_batch_size // (phase.num_mini_batches * world)
    micro = min(phase.micro_batch_size or share, share)
    return micro, share // micro


@contextlib.contextmanager
def loading_context(cfg):
    """Around the loading of PPO's models. Under ZeRO-3, transformers' HfDeepSpeedConfig (alive for the block)
    makes ``from_pretrained`` build each model partitioned over the processes (zero.Init), so no process ever
    holds whole weights. Under FSDP only rank 0 reads the checkpoints; the other processes build skeletons and
    receive rank 0's weights when :class:`FSDP` shards them (``models.broadcast_loading``)."""
    if sharding.zero_stage(cfg.hardware) == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo" if cfg.hardware.accelerator == "cpu" else "nccl")
        partitioned = HfDeepSpeedConfig(DeepSpeed.train_config(cfg.phase, cfg.hardware, _world(cfg.hardware)))
        yield
        del partitioned
        return
    with broadcast_loading(cfg.hardware):
        yield


def _world(hw) -> int:
    return int(hw.num_processes) * int(hw.num_nodes)


class Backend:
    """The interface the trainer uses. ``policy`` / ``critic`` / ``reference`` / ``reward_model`` are called
    for forward passes; ``reference`` is None when the policy has LoRA adapters (disabled = the reference)."""

    # extra generate() arguments (sharded models: every process steps until all are done)
    generate_kwargs: dict = {}

    def __init__(self, cfg, policy, critic, reference, reward_model, accelerator, policy_lr: float, run_dir=None):
        self.cfg, self.phase, self.hw = cfg, cfg.phase, cfg.hardware
        self.accelerator, self.device = accelerator, accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.policy_lr, self.critic_lr = policy_lr, cfg.phase.critic_learning_rate
        self.micro, self.accumulation = micro_batches(cfg.phase, self.world)

    # -- forward ---------------------------------------------------------------------------------
    def bare_policy(self):
        """The policy module itself (out of any DDP wrapper): generate(), disable_adapter(), evaluation."""
        return self.policy

    @contextlib.contextmanager
    def frozen(self, model):
        """A frozen model ready on the device for the block."""
        yield model

    # -- backward and step -----------------------------------------------------------------------
    def accumulating(self, last: bool):
        """Context of one micro-batch's backward; gradients are synchronised on the ``last`` one."""
        return contextlib.nullcontext()

    def backward(self, policy_loss, value_loss) -> None:
        raise NotImplementedError

    def nonfinite_gradients(self) -> bool:
        """Whether any process holds a NaN/inf gradient (the same answer on every process)."""
        raise NotImplementedError

    def step(self) -> None:
        """Clip (phase.max_grad_norm), apply and clear the accumulated gradients of policy and critic."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: Path, trainer_state: dict) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> dict:
        """Restore models and optimizers; returns the trainer state saved with them."""
        raise NotImplementedError

    def save_model(self, path: str) -> None:
        """Whole policy weights into ``path`` (a collective: every process calls it; rank 0 writes)."""
        raise NotImplementedError

    def final_policy(self):
        """(model, saver) for ``models.save_for_next_phase``: the bare policy when one process holds it
        whole, else this backend (its ``save_model`` gathers the shards)."""
        return None, self

    def policy_weights(self):
        """The policy's weights as the plain model names them, (name, whole tensor) one at a time, LoRA adapters
        merged in (``models.merged_lora_weights``): what a rollout engine loads (``rollout_engines.VLLMEngine``).
        A collective under sharding: every process iterates, in the same order; each tensor is valid until the next
        is drawn (a gathered shard is freed)."""
        from rlhf_exp.models import merged_lora_weights

        model = self.bare_policy()
        config = model.peft_config["default"] if hasattr(model, "peft_config") else None
        return merged_lora_weights(self._whole_parameters(), config)

    def _whole_parameters(self):
        for name, param in self.bare_policy().named_parameters():
            yield name, param.detach()

    # -- helpers shared by the sharded backends ------------------------------------------------------
    def _trainer_state_path(self, folder: Path) -> Path:
        return Path(folder) / "trainer_state.pt"

    def _save_trainer_state(self, folder: Path, trainer_state: dict) -> None:
        # every process's RNG states (nothing in PPO draws from them today; a resumed run stays exact if it ever does)
        torch.save({"rng": torch.get_rng_state()}, Path(folder) / f"rng_state_{self.rank}.pt")
        if self.rank == 0:
            torch.save(trainer_state, self._trainer_state_path(folder))

    def _load_trainer_state(self, folder: Path) -> dict:
        rng = Path(folder) / f"rng_state_{self.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=False)["rng"])
        return torch.load(self._trainer_state_path(folder), weights_only=False)


class Accelerated(Backend):
    """One process, or DDP over several (accelerate)."""

    def __init__(self, cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir=None):
        super().__init__(cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir)
        from rlhf_exp.optim import build_optimizer

        wd = self.phase.weight_decay
        policy_opt = build_optimizer([p for p in policy.parameters() if p.requires_grad], self.hw, policy_lr, wd)
        critic_opt = build_optimizer([p for p in critic.parameters() if p.requires_grad], self.hw, self.critic_lr, wd)
        self.policy, self.critic, self.policy_opt, self.critic_opt = accelerator.prepare(
            policy, critic, policy_opt, critic_opt)
        self._state: dict = {}
        accelerator.register_for_checkpointing(self)  # the trainer's state travels in save_state/load_state
        self.offload = bool(self.hw.offload_frozen) and accelerator.device.type != "cpu"
        self.reference, self.reward_model = reference, reward_model
        for frozen in (reference, reward_model):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
                if not getattr(frozen, "is_quantized", False):  # bitsandbytes weights are placed at load
                    frozen.to("cpu" if self.offload else self.device)

    def bare_policy(self):
        return self.accelerator.unwrap_model(self.policy)

    @contextlib.contextmanager
    def frozen(self, model):
        if not self.offload:
            yield model
            return
        model.to(self.device)
        try:
            yield model
        finally:
            model.to("cpu")

    def accumulating(self, last: bool):
        if last or self.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()  # DDP all-reduces on the last micro-batch only
        stack.enter_context(self.accelerator.no_sync(self.policy))
        stack.enter_context(self.accelerator.no_sync(self.critic))
        return stack

    def backward(self, policy_loss, value_loss) -> None:
        self.accelerator.backward(policy_loss + value_loss)

    def nonfinite_gradients(self) -> bool:
        from rlhf_exp.tracking.hf_callback import nonfinite_gradients

        if self.accelerator.mixed_precision == "fp16":  # its loss scaler skips overflowing steps itself
            return False
        return nonfinite_gradients([*self.policy.parameters(), *self.critic.parameters()])

    def step(self) -> None:
        self.accelerator.clip_grad_norm_(self.policy.parameters(), self.phase.max_grad_norm)
        self.accelerator.clip_grad_norm_(self.critic.parameters(), self.phase.max_grad_norm)
        self.policy_opt.step()
        self.critic_opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.policy_opt.zero_grad()
        self.critic_opt.zero_grad()

    def save(self, folder: Path, trainer_state: dict) -> None:
        self._state = trainer_state
        self.accelerator.save_state(str(folder))  # trainer state through register_for_checkpointing

    def load(self, folder: Path) -> dict:
        self.accelerator.load_state(str(folder))
        return self._state

    # accelerate's checkpoint hooks: the trainer state travels inside save_state/load_state
    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = state

    def final_policy(self):
        return self.bare_policy(), None


def whole_parameters(model, device):
    """(name, whole tensor) for each parameter of an FSDP2 model, all-gathered from the processes' shards one at a
    time (a collective: every process iterates, in the same order)."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        param = param.detach()
        if isinstance(param, DTensor):
            if param.device.type != device.type:  # offload_params: shards wait in CPU RAM
                param = param.to(device)
            param = param.full_tensor()
        yield name, param


class FSDP(Backend):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) for all four models."""

    generate_kwargs = {"synced_gpus": True}

    def __init__(self, cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir=None):
        super().__init__(cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir)
        import warnings

        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        from rlhf_exp.optim import build_optimizer

        # our forward outputs (logits) are only sliced and read, never changed in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.hw.precision))
        # trained weights stay fp32 (the optimizer's master copy); forward/backward in the half dtype, gradients
        # reduced in fp32
        mixed = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
        offload = {True: CPUOffloadPolicy(), False: OffloadPolicy()}
        self.policy = self._shard(policy, mixed, offload[bool(self.hw.offload_params)])
        self.critic = self._shard(critic, mixed, offload[bool(self.hw.offload_params)])
        self.reference = self._shard(reference, MixedPrecisionPolicy(), offload[bool(self.hw.offload_frozen)], True)
        self.reward_model = self._shard(reward_model, MixedPrecisionPolicy(), offload[bool(self.hw.offload_frozen)], True)
        wd = self.phase.weight_decay
        self.policy_opt = build_optimizer([p for p in self.policy.parameters() if p.requires_grad], self.hw, policy_lr, wd)
        self.critic_opt = build_optimizer([p for p in self.critic.parameters() if p.requires_grad], self.hw,
                                          self.critic_lr, wd)
        settings = {"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap": "each decoder layer, then the model",
                    "mixed_precision": {"param_dtype": str(half or "fp32"), "reduce_dtype": "float32"},
                    "offload_params": bool(self.hw.offload_params), "offload_frozen": bool(self.hw.offload_frozen)}
        sharding.record(run_dir, "fsdp.json", settings)  # (rank 0 writes)

    def _shard(self, model, mixed, offload, frozen: bool = False):
        if model is None:
            return None
        from torch.distributed.fsdp import fully_shard

        if frozen:
            model.requires_grad_(False).eval()
        # loaded by rank 0 alone (models.broadcast_loading): its whole weights, kept to broadcast after sharding
        broadcast = broadcasts(self.hw)
        whole = model.state_dict() if broadcast and self.rank == 0 else None
        # no model.to(device) first: fully_shard moves each layer's weights to the device as it shards them, so a GPU
        # never holds more than one whole layer at a time
        # the transformers model is the root, also inside a peft wrapper: generate() and forward both enter it,
        # so its hooks gather what the layers leave (embeddings, final norm, head)
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = set(getattr(root, "_no_split_modules", None) or ())
        for module in root.modules():
            if type(module).__name__ in names:  # each decoder layer is one unit of gathering
                fully_shard(module, mp_policy=mixed, offload_policy=offload)
        fully_shard(root, mp_policy=mixed, offload_policy=offload)
        if broadcast:
            from torch.distributed.fsdp import CPUOffloadPolicy

            load_from_rank0(model, whole, torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else self.device)
        return model

    def accumulating(self, last: bool):
        for model in (self.policy, self.critic):
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, policy_loss, value_loss) -> None:
        (policy_loss + value_loss).backward()

    def nonfinite_gradients(self) -> bool:
        bad = torch.zeros(1, device=self.device)
        for p in [*self.policy.parameters(), *self.critic.parameters()]:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if not torch.isfinite(g).all():
                    bad.fill_(1)
                    break
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item())

    def step(self) -> None:
        for model, opt in ((self.policy, self.policy_opt), (self.critic, self.critic_opt)):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.phase.max_grad_norm)
            opt.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.policy_opt.zero_grad()
        self.critic_opt.zero_grad()

    def _states(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state = {}
        for name, model, opt in (("policy", self.policy, self.policy_opt), ("critic", self.critic, self.critic_opt)):
            model_sd, optim_sd = get_state_dict(model, opt)
            state[name] = {"model": model_sd, "optim": optim_sd}
        return state

    def save(self, folder: Path, trainer_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        # each process writes its shards (torch.distributed.checkpoint); a different process count can load them
        dcp.save(self._states(), checkpoint_id=str(Path(folder) / "models"))
        self._save_trainer_state(folder, trainer_state)

    def load(self, folder: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._states()
        dcp.load(state, checkpoint_id=str(Path(folder) / "models"))
        for name, model, opt in (("policy", self.policy, self.policy_opt), ("critic", self.critic, self.critic_opt)):
            set_state_dict(model, opt, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"])
        return self._load_trainer_state(folder)

    def _whole_parameters(self):
        return whole_parameters(self.policy, self.device)

    def save_model(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            save_gathered(self.policy, full, path)


def zero3_whole_parameters(model):
    """(name, whole tensor) for each parameter of a ZeRO-3 partitioned model, gathered one at a time (a collective:
    every process iterates, in the same order; a tensor is valid until the next is drawn)."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # whole on every process inside the block
            yield name, param.data


class DeepSpeed(Backend):
    """One DeepSpeed engine per trained model (ZeRO stage 2 or 3), inference engines for the frozen ones
    under ZeRO-3. Gradient accumulation over micro-batches is DeepSpeed's (its step applies the update at
    the mini-batch's last micro-batch); clipping is its ``gradient_clipping``."""

    def __init__(self, cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir=None):
        super().__init__(cfg, policy, critic, reference, reward_model, accelerator, policy_lr, run_dir)
        import deepspeed

        from rlhf_exp.optim import build_optimizer

        deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else "nccl")  # once; no-op after
        train = self.train_config(self.phase, self.hw, self.world)
        self.stage = sharding.zero_stage(self.hw)
        self.sharded = self.stage == 3
        self.generate_kwargs = {"synced_gpus": True} if self.sharded else {}
        engines = []
        for model, lr in ((policy, policy_lr), (critic, self.critic_lr)):
            config = dict(train)
            kwargs = {}
            if self.hw.offload_optimizer:  # ZeRO-Offload steps with DeepSpeed's own CPU Adam
                config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": self.phase.weight_decay}}
            else:
                kwargs["optimizer"] = build_optimizer([p for p in model.parameters() if p.requires_grad], self.hw, lr,
                                                      self.phase.weight_decay)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                            if p.requires_grad], config=config, **kwargs)
            engines.append(engine)
        self.policy, self.critic = engines
        frozen_config = self.frozen_config(self.phase, self.hw, self.world)
        self.reference, self.reward_model = (self._frozen(m, frozen_config) for m in (reference, reward_model))
        sharding.record(run_dir, "deepspeed.json", {"trained": train, "frozen": frozen_config})  # (rank 0 writes)

    @staticmethod
    def train_config(phase, hw, world: int) -> dict:
        micro, accumulation = micro_batches(phase, world)
        return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                "gradient_clipping": phase.max_grad_norm,
                "zero_optimization": sharding.zero_section(hw), **sharding.precision_section(hw),
                "steps_per_print": 10**9, "wall_clock_breakdown": False}

    @staticmethod
    def frozen_config(phase, hw, world: int) -> dict:
        micro, _ = micro_batches(phase, world)
        return {"train_micro_batch_size_per_gpu": micro,
                "zero_optimization": sharding.zero_section(hw, frozen=True), **sharding.precision_section(hw),
                "steps_per_print": 10**9}

    def _frozen(self, model, config):
        if model is None:
            return None
        model.requires_grad_(False).eval()
        if not self.sharded:  # ZeRO-2 shards what training adds; a frozen model stays whole (16-bit on GPUs)
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.hw.precision))
            return model.to(self.device, dtype=half) if half else model.to(self.device)
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def bare_policy(self):
        return self.policy.module

    def _whole_parameters(self):
        if not self.sharded:
            return super()._whole_parameters()
        return zero3_whole_parameters(self.policy.module)

    def backward(self, policy_loss, value_loss) -> None:
        self._check_finite(policy_loss + value_loss)
        # the losses are already means over the whole mini-batch: no further division by the micro-batch count
        self.policy.backward(policy_loss, scale_wrt_gas=False)
        self.critic.backward(value_loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-batches by its step() calls: one per backward; the update itself happens at the
        # gradient-accumulation boundary (the mini-batch's last micro-batch)
        self.policy.step()
        self.critic.step()

    def _check_finite(self, loss) -> None:
        """DeepSpeed applies what it accumulates at the boundary, so a NaN/inf loss stops the run before its
        backward (validate refuses phase.skip_nonfinite_batches under DeepSpeed)."""
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise FloatingPointError("NaN/inf PPO loss: training stopped before its gradients were applied (the weights "
                                     "stay finite; the latest complete checkpoint, if any, is the last good state). Run "
                                     "again with a lower phase.learning_rate or phase.max_grad_norm")

    def nonfinite_gradients(self) -> bool:
        return False  # checked on the loss before backward (_check_finite)

    def step(self) -> None:
        """Done by the engines in :meth:`backward`: at the mini-batch's last micro-batch they clip, apply, clear."""

    def zero_grad(self) -> None:
        self.policy.zero_grad()
        self.critic.zero_grad()

    def save(self, folder: Path, trainer_state: dict) -> None:
        self.policy.save_checkpoint(str(folder), tag="policy", save_latest=False)
        self.critic.save_checkpoint(str(folder), tag="critic", save_latest=False)
        self._save_trainer_state(folder, trainer_state)

    def load(self, folder: Path) -> dict:
        for engine, tag in ((self.policy, "policy"), (self.critic, "critic")):
            path, _ = engine.load_checkpoint(str(folder), tag=tag)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {folder}")
        return self._load_trainer_state(folder)

    def save_model(self, path: str) -> None:
        if self.sharded:
            full = self.policy._zero3_consolidated_16bit_state_dict()  # collective; whole on rank 0 only
        else:
            full = self.policy.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            save_gathered(self.policy.module, full, path)
