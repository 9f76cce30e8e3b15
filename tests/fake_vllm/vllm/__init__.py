"""A stand-in for vLLM's offline API (``LLM``, ``SamplingParams``), for the CPU tests of
``rlhf_exp.ppo.rollout_engines.VLLMEngine``: the same calls, answered by a Hugging Face model built from the folder's
config with placeholder weights (vLLM's ``load_format="dummy"``), which ``load_weights`` then overwrites. It samples
each answer from softmax(logits / temperature) with its own seeded generator, as vLLM does with a per-request seed.
It proves the wiring (arguments, weight names, weight loading, seeds, log-probabilities), not vLLM itself: that needs a
GPU (benchmarks/rollout_engines.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

__version__ = "0.0-fake"
ENGINES: list = []  # every LLM built, for the tests to inspect


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    logprobs: int | None = None
    detokenize: bool = True
    stop_token_ids: list = field(default_factory=list)


@dataclass
class Logprob:
    logprob: float
    rank: int = 1


class _Loader:
    """vLLM's model object as far as weight loading goes: Hugging Face names in, copied into the weights."""

    def __init__(self, model, engine):
        self.model, self.engine = model, engine
        self.params = dict(model.named_parameters())
        self.loaded: list[str] = []

    def load_weights(self, weights):
        if "weights" in self.engine.asleep:
            raise RuntimeError("fake vLLM: load_weights while the weights sleep (wake_up(tags=['weights']) first)")
        for name, tensor in weights:
            if name not in self.params:
                raise KeyError(f"fake vLLM: no weight named {name}")
            with torch.no_grad():
                self.params[name].copy_(tensor)
            self.loaded.append(name)


# the engine arguments rlhf_exp passes, as vLLM's EngineArgs names them (an unknown one is refused, as vLLM does)
ENGINE_ARGS = {"skip_tokenizer_init", "load_format", "dtype", "seed", "max_model_len", "max_num_batched_tokens",
               "gpu_memory_utilization", "enable_sleep_mode", "distributed_executor_backend", "tensor_parallel_size",
               "generation_config", "logprobs_mode"}


class LLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM

        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"fake vLLM: unknown engine arguments {sorted(unknown)}")
        self.kwargs = dict(kwargs, model=model)
        self.asleep: set[str] = set()
        torch.manual_seed(kwargs.get("seed", 0))  # as vLLM's worker reseeds the process's generators
        self.hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval()  # placeholder weights
        self.loader = _Loader(self.hf, self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=self.loader))))
        self.calls: list[str] = []
        ENGINES.append(self)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level: int = 1):
        self.calls.append(f"sleep{level}")
        self.asleep = {"weights", "kv_cache"}
        if level == 2:  # level 2 discards the weights
            with torch.no_grad():
                for param in self.hf.parameters():
                    param.fill_(float("nan"))

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up:{','.join(tags or [])}")
        self.asleep -= set(tags or ["weights", "kv_cache"])

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        if self.asleep:
            raise RuntimeError(f"fake vLLM: generate while {sorted(self.asleep)} sleep")
        self.calls.append("generate")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        outputs = []
        for prompt, p in zip(prompts, params):
            generator = torch.Generator().manual_seed(p.seed)
            ids = list(prompt["prompt_token_ids"])
            answer, logprobs, reason = [], [], "length"
            for _ in range(p.max_tokens):
                logits = self.hf(input_ids=torch.tensor([ids + answer])).logits[0, -1].float() / p.temperature
                logp = torch.log_softmax(logits, -1)
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                answer.append(token)
                logprobs.append({token: Logprob(float(logp[token]))})
                if token in p.stop_token_ids:
                    reason = "stop"
                    break
            done = SimpleNamespace(token_ids=answer, logprobs=logprobs if p.logprobs is not None else None,
                                   finish_reason=reason)
            outputs.append(SimpleNamespace(prompt_token_ids=ids, outputs=[done]))
        return outputs
