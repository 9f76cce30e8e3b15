"""Rollout throughput of PPO's rollout engines (``phase.rollout_engine``, ``phase.generation_cache``,
``phase.compile_generation``): generated tokens per second through rlhf_exp's own engine classes
(rlhf_exp.ppo.rollout_engines), each variant in a fresh process, interleaved rounds (benchmarks/harness.py).

    python benchmarks/rollout_engines.py                       # CPU: hf dynamic / static / compiled, 6.3M Llama
    python benchmarks/rollout_engines.py --size 0.5b --device cuda --dtype bfloat16 \
        --engines hf-dynamic,hf-static,hf-compiled,vllm

A variant builds its model from config (random weights, seed 0; ``6m``: Llama, hidden 256, 6 layers, 32k vocabulary;
``0.5b``: Qwen2.5-0.5B's shape, hidden 896, 24 layers, 152k vocabulary), saves it to a temporary folder (vLLM reads
its config from there), then samples ``--rollouts`` rollouts of ``--prompts`` left-padded prompts of 16-48 tokens
with ``--new-tokens`` new tokens each at temperature 1 (the engines stop at an EOS id outside the vocabulary: every
answer is full length, equal work for every engine). The first rollout (compilation, CUDA graphs, vLLM's start) is timed
apart (``first_s``); ``tokens_per_s`` is over the others. The vllm variant also loads the weights into the engine
once before each rollout (as PPO does after an update): ``sync_s`` is their mean, not counted in tokens_per_s.
``logprob_gap``: after the timed rollouts, one more; the largest difference between the log-probability each sampled
token had under the engine's own logits (the hf sampler's record, vLLM's logprobs) and under a forward of the model
over prompt and answer (what phase.rollout_logprobs=auto relies on in fp32; what rollout/engine_logprob_gap reports).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

SIZES = {
    "6m": dict(family="llama", vocab_size=32768, hidden_size=256, num_hidden_layers=6, intermediate_size=1024,
               num_attention_heads=4, num_key_value_heads=4),
    "0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}


def build(size: str, folder: Path, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SIZES[size])
    family = spec.pop("family")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**spec, pad_token_id=0, bos_token_id=1, eos_token_id=spec["vocab_size"] - 1,
                        max_position_embeddings=512)
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(folder)
    return model.to(dtype).eval()


def child(args) -> None:
    import tempfile

    import torch

    from rlhf_exp.data.encode import pad
    from rlhf_exp.models import merged_lora_weights
    from rlhf_exp.ppo.rollout_engines import HFEngine, VLLMEngine
    from rlhf_exp.sampling import SeededSampler

    torch.set_num_threads(1) if args.device == "cpu" else None
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.size, Path(tmp), dtype).to(device)
        vocab = model.config.vocab_size
        # the engines stop at an EOS id outside the vocabulary, never sampled: every answer is full length
        tok = SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=vocab)
        cache, compiled = {"hf-dynamic": ("dynamic", False), "hf-static": ("static", False),
                           "hf-compiled": ("static", True), "vllm": ("dynamic", False)}[args.engine]
        phase = SimpleNamespace(max_new_tokens=args.new_tokens, temperature=1.0, generation_cache=cache,
                                compile_generation=compiled, max_length=48 + args.new_tokens,
                                vllm_gpu_memory_utilization=0.5, vllm_sleep=False)
        precision = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, "fp32")
        cfg = SimpleNamespace(phase=phase, hardware=SimpleNamespace(precision=precision), seed=0)
        backend = SimpleNamespace(device=device, rank=0, world=1, generate_kwargs={}, bare_policy=lambda: model,
                                  policy_weights=lambda: merged_lora_weights(model.named_parameters(), None))
        engine = (VLLMEngine(cfg, backend, tok, tmp) if args.engine == "vllm" else HFEngine(cfg, backend, tok))
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, vocab - 1, (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 49, (args.prompts,), generator=g)]
        ids, attn = pad(prompts, 0, side="left")
        ids, attn = ids.to(device), attn.to(device)
        seconds, tokens, syncs = [], 0, []
        for r in range(args.rollouts + 1):
            if args.engine == "vllm":
                start = time.perf_counter()
                engine.sync(r)
                syncs.append(time.perf_counter() - start)
            sampler = SeededSampler(1.0, r, slice(0, len(prompts)), len(prompts), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                out, _ = engine.generate(ids, attn, prompts, sampler)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            if r:
                tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        # one more rollout, untimed: the log-probabilities the engine's own logits gave each sampled token (the hf
        # sampler's record; vLLM's logprobs) against a forward of the model over prompt and answer
        from rlhf_exp.sampling import token_logprobs

        hf = isinstance(engine, HFEngine)
        sampler = SeededSampler(1.0, 10**6, slice(0, len(prompts)), len(prompts), device, record=hf)
        with torch.no_grad():
            out, engine_logprobs = engine.generate(ids, attn, prompts, sampler)
            width = out.shape[1] - ids.shape[1]
            full = torch.cat([attn, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
            forward, _ = token_logprobs(model, out, full, ids.shape[1], 1.0, entropy=False)
        own = sampler.recorded(width)[0] if hf else engine_logprobs
        print(f"logprob_gap={(own.float() - forward.float()).abs().max().item():.3e}")
        print(f"first_s={seconds[0]:.4f}")
        print(f"tokens_per_s={tokens / sum(seconds[1:]):.2f}")
        if syncs:
            print(f"sync_s={sum(syncs[1:]) / len(syncs[1:]):.4f}")


def parse(text: str, _tmp) -> dict:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("first_s", "tokens_per_s", "sync_s", "logprob_gap"):
            out[key] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", choices=list(SIZES), default="6m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engines", default="hf-dynamic,hf-static,hf-compiled")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rollouts", type=int, default=3)
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args(argv)
    if args.engine:
        child(args)
        return 0
    print(header())
    print(f"rounds: {args.reps}; size {args.size} on {args.device} in {args.dtype}; {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, {args.rollouts} timed rollouts after a first one\n")
    me = str(Path(__file__).resolve())
    engines = args.engines.split(",")
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--prompts", str(args.prompts),
              "--new-tokens", str(args.new_tokens), "--rollouts", str(args.rollouts)]
    env = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {}
    results = interleaved([Variant(e, python(me, "--engine", e, *common), env, parse=parse) for e in engines],
                          reps=args.reps)
    report(results, baseline=engines[0], extra=("first_s", "tokens_per_s", "sync_s"))
    for name, runs in results.items():
        if name != engines[0]:
            ratios = sorted(r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, results[engines[0]]))
            print(f"tokens/s {name} / {engines[0]}: {ratios[0]:.3f} / {ratios[len(ratios) // 2]:.3f} / {ratios[-1]:.3f}")
    for name, runs in results.items():
        gap = max(r["logprob_gap"] for r in runs)
        print(f"{name}: largest |log-probability from the engine's logits - a forward's| {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
