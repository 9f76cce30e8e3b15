"""What generates PPO's rollouts (``phase.rollout_engine``): the policy's own ``generate()`` or a vLLM engine.

Both sample from softmax(logits / phase.temperature) with no truncation, each answer's random draws from a seed that
depends on the step and the prompt's row in the whole rollout batch only. With hf that makes the answers the same
however many processes share the batch; vLLM's batched (bf16) logits also depend on which rows share its batch, so
an answer can differ at a near-tie draw.

- :class:`HFEngine` (``hf``): generate() over :class:`rlhf_exp.sampling.SeededSampler`; its KV cache dynamic or
  static (``phase.generation_cache``), the decoding step compiled with ``phase.compile_generation``. Its sampler can
  record each token's log-probability (``phase.rollout_logprobs``), exact in fp32.
- :class:`VLLMEngine` (``vllm``, CUDA): a vLLM engine in each process, colocated with training (one GPU each, no
  tensor parallelism), built at the first rollout with placeholder weights. Before the first rollout and before each rollout that
  follows an update, the policy's weights are loaded into it (:meth:`Backend.policy_weights`: whole tensors one at
  a time, gathered from the shards under FSDP / ZeRO-3, LoRA adapters merged in on the way; the training copy is
  never modified). The rollout's log-probabilities are then recomputed by a forward of the trained policy, so PPO's
  ratio is exact; vLLM's own log-probabilities are kept only to report ``rollout/engine_logprob_gap`` (the mean
  absolute difference per answer token: ~1e-3 in bf16 is kernel rounding; a large gap means the engine holds other
  weights than the policy).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlhf_exp.sampling import SeededSampler, sample


def rollout_engine(cfg, backend, tokenizer, model_path: str | Path | None = None):
    """The engine ``cfg.phase.rollout_engine`` names, over the models ``backend`` holds. ``model_path``: a folder with
    the policy's config.json (the vllm engine builds its model from it)."""
    if str(cfg.phase.rollout_engine) == "vllm":
        return VLLMEngine(cfg, backend, tokenizer, model_path)
    return HFEngine(cfg, backend, tokenizer)


def row_seed(step_seed: int, row: int) -> int:
    """The seed of one answer: from the step's seed and the prompt's row in the whole rollout batch."""
    return (step_seed * 1_000_003 + row) % (2**63 - 1)


class HFEngine:
    """phase.rollout_engine=hf: the policy's own generate()."""

    # its sampler's recorded log-probabilities may stand in for a forward of the policy (phase.rollout_logprobs)
    records_logprobs = True

    def __init__(self, cfg, backend, tokenizer):
        self.phase, self.backend, self.tokenizer = cfg.phase, backend, tokenizer
        self.settings = generation_settings(cfg.phase, backend.device)

    def needs_sync(self, step: int) -> bool:
        return False  # it generates with the policy itself

    def sync(self, step: int) -> None:
        pass

    def generate(self, ids, attn, prompt_ids: list[list[int]], sampler: SeededSampler):
        """Prompt (left-padded) + answer ids, [rows, P + R], and None (no engine log-probabilities of its own)."""
        out = sample(self.backend.bare_policy(), self.tokenizer, ids, attn, sampler, self.phase.max_new_tokens,
                     generation=self.settings, **self.backend.generate_kwargs)
        return out, None


def generation_settings(phase, device) -> dict:
    """generate()'s cache and compilation settings for phase.generation_cache / phase.compile_generation.

    A static cache alone never compiles (transformers compiles the decoding step by itself when it sees a static
    cache on a GPU: ``disable_compile`` keeps that to phase.compile_generation). Compiled on a CPU, the graph is
    inductor's C++; on a GPU, CUDA graphs ("reduce-overhead")."""
    if str(phase.generation_cache) != "static":
        return {}
    if not phase.compile_generation:
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    on_gpu = getattr(device, "type", str(device)) == "cuda"
    config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if on_gpu else "default")
    config._compile_all_devices = True  # transformers compiles on CUDA/XPU only unless told
    return {"cache_implementation": "static", "compile_config": config}


class VLLMEngine:
    """phase.rollout_engine=vllm: a colocated vLLM engine in this process (see the module's docstring)."""

    records_logprobs = False  # vLLM's kernels are not the trained policy's: a forward recomputes them

    def __init__(self, cfg, backend, tokenizer, model_path):
        self.cfg, self.phase, self.backend, self.tokenizer = cfg, cfg.phase, backend, tokenizer
        self.model_path = model_path
        self.llm = None  # built at the first sync: outside the models' loading context (ZeRO-3's zero.Init)
        self.synced_at: int | None = None
        self.sleeping = False

    def _build(self):
        """The engine, with placeholder weights. vLLM reseeds the process's random generators as it starts (its
        worker runs in this process): they are put back as they were."""
        import random

        from vllm import LLM

        cfg, phase, backend = self.cfg, self.phase, self.backend
        # vLLM's "external launcher": it joins the process group torchrun/accelerate made, one engine per process
        for key, value in (("RANK", backend.rank), ("LOCAL_RANK", backend.device.index or 0),
                           ("WORLD_SIZE", backend.world), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, str(value))
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(str(cfg.hardware.precision), "float32")
        import numpy as np

        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda" else []):
            llm = LLM(
                model=str(self.model_path),
                skip_tokenizer_init=True,  # prompts arrive as ids; answers leave as ids
                load_format="dummy",  # placeholder weights: the policy's are loaded before the first rollout
                dtype=dtype,
                seed=cfg.seed + backend.rank,  # the answers' own seeds are per row (row_seed)
                max_model_len=phase.max_length,  # prompts are at most max_length - max_new_tokens (runners.ppo)
                max_num_batched_tokens=max(4096, phase.max_length),
                gpu_memory_utilization=phase.vllm_gpu_memory_utilization,
                enable_sleep_mode=bool(phase.vllm_sleep),
                distributed_executor_backend="external_launcher",
                tensor_parallel_size=1,
                generation_config="vllm",  # not the checkpoint's generation_config.json (top_k, penalties, EOS ids)
                logprobs_mode="processed_logprobs",  # after temperature: the distribution PPO scores
            )
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if phase.vllm_sleep:
            llm.sleep(level=2)
            self.sleeping = True
        return llm

    def _wake(self, tags: list[str]) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.empty_cache()  # memory the update's allocator cached, which vLLM's own allocator cannot use
        self.llm.wake_up(tags=tags)

    def model(self):
        """The engine's model (vLLM's loader names its weights as the Hugging Face checkpoint does)."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def needs_sync(self, step: int) -> bool:
        return self.synced_at != step

    def sync(self, step: int) -> None:
        """Load the policy's current weights into the engine. A collective under FSDP / ZeRO-3: every process calls
        it at the same point (each loads its own engine)."""
        if self.llm is None:
            self.llm = self._build()
        if self.sleeping:
            self._wake(["weights"])
        model = self.model()
        for name, tensor in self.backend.policy_weights():
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed by the old weights
        self.synced_at = step

    def generate(self, ids, attn, prompt_ids: list[list[int]], sampler: SeededSampler):
        """Prompt (left-padded, as given) + answer ids (padded after the answer), [rows, P + R], and vLLM's
        log-probability of each answer token, [rows, R]."""
        from vllm import SamplingParams

        tok, phase = self.tokenizer, self.phase
        if self.sleeping:
            self._wake(["kv_cache"])
            self.sleeping = False
        first = sampler.rows.start
        params = [SamplingParams(n=1, temperature=phase.temperature, top_p=1.0, max_tokens=phase.max_new_tokens,
                                 seed=row_seed(sampler.seed, first + i), logprobs=0, detokenize=False,
                                 stop_token_ids=[tok.eos_token_id]) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        if phase.vllm_sleep:
            self.llm.sleep(level=2)  # frees weights and cache: the next rollout loads the weights again
            self.sleeping, self.synced_at = True, None
        answers, logprobs = [], []
        for output in outputs:  # an answer that stopped at the EOS ends with it (vLLM keeps a stop token id)
            done = output.outputs[0]
            answers.append(list(done.token_ids))
            logprobs.append([entry[token].logprob for entry, token in zip(done.logprobs, done.token_ids)])
        width = max(1, max(len(a) for a in answers))
        response = torch.full((len(answers), width), tok.pad_token_id, dtype=ids.dtype)
        engine_logprobs = torch.zeros(len(answers), width)
        for i, (answer, lps) in enumerate(zip(answers, logprobs)):
            response[i, :len(answer)] = torch.tensor(answer, dtype=ids.dtype)
            engine_logprobs[i, :len(lps)] = torch.tensor(lps)
        return torch.cat([ids, response.to(ids.device)], dim=1), engine_logprobs.to(ids.device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
