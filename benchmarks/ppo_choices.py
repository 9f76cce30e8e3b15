"""The measurements behind two choices in rlhf_exp's PPO loop, on a 6-layer Llama built from config (hidden 256,
MLP 1024, 64-token vocabulary; random weights, seed 0), left-padded prompts of 6-15 tokens, 16 new tokens.

    python benchmarks/ppo_choices.py               # both parts (~2 min on 2 cores)
    python benchmarks/ppo_choices.py --reps 5

1. ``phase.rollout_logprobs``: how far the log-probabilities the sampler records from generate()'s logits (KV
   cache, one position at a time) are from a forward's over prompt and answer (rlhf_exp.sampling.token_logprobs),
   in fp32 and in bf16 (CPU bf16 matmuls), over 64 answers: the largest and mean absolute difference, and the
   range of exp(difference), the first update's PPO ratio if the forward were the new policy.
2. ``torch.no_grad()`` against ``torch.inference_mode()`` for the frozen models' scoring forwards: 20 forwards of
   128 sequences of 24 tokens (the LM head on the last 9 positions, as in PPO), each variant in a fresh process,
   interleaved rounds, wall/CPU/peak RSS ratios round by round (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def model(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=6, intermediate_size=1024,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval().to(dtype)


def logprob_gap() -> None:
    import torch

    from rlhf_exp.sampling import SeededSampler, sample, token_logprobs

    class Tok:  # what sample() needs of a tokenizer
        pad_token_id, bos_token_id, eos_token_id = 0, None, None

    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16):
        m = model(dtype)
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(6, 16, (64,), generator=g).tolist()
        width = max(lengths)
        ids = torch.zeros(64, width, dtype=torch.long)
        attn = torch.zeros(64, width, dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, width - n:] = torch.randint(2, 64, (n,), generator=g)
            attn[i, width - n:] = 1
        sampler = SeededSampler(1.0, 3, slice(0, 64), 64, "cpu", record=True)
        with torch.no_grad():
            out = sample(m, Tok(), ids, attn, sampler, max_new_tokens=16)
            recorded, _ = sampler.recorded(out.shape[1] - width)
            full = torch.cat([attn, torch.ones_like(out[:, width:])], dim=1)
            forward, _ = token_logprobs(m, out, full, width, 1.0, entropy=False)
        gap = (recorded - forward).abs()
        ratio = (forward - recorded).exp()
        print(f"{str(dtype).replace('torch.', ''):<9} max |difference| {gap.max().item():.2e}  mean {gap.mean().item():.2e}  "
              f"ratio {ratio.min().item():.7f} .. {ratio.max().item():.7f}  ({gap.numel()} tokens)")


def forwards(mode: str) -> None:
    import torch

    torch.set_num_threads(1)
    m = model(torch.float32)
    ids = torch.randint(2, 64, (128, 24), generator=torch.Generator().manual_seed(0))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        for _ in range(20):
            m(input_ids=ids, logits_to_keep=9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--forwards", choices=["no_grad", "inference_mode"], help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args(argv)
    if args.forwards:
        forwards(args.forwards)
        return 0
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process\n")
    print("1. log-probabilities from the sampler against a forward's (64 answers of 16 tokens)")
    logprob_gap()
    print("\n2. the frozen models' scoring forwards: no_grad against inference_mode (fresh process each)")
    me = str(Path(__file__).resolve())
    results = interleaved([Variant(mode, python(me, "--forwards", mode), ENV) for mode in ("no_grad", "inference_mode")],
                          reps=args.reps)
    report(results, baseline="no_grad")
    return 0


if __name__ == "__main__":
    sys.exit(main())
