"""PPO's update with micro-batches cut to the columns they need and sorted by length (rlhf_exp.ppo.trainer.trimmed)
against the same update over the rollout's full padded width, on rollouts whose lengths vary as real data's do.

    python benchmarks/ppo_padding.py                  # 3 rounds, fixed lengths and HH-like lengths
    python benchmarks/ppo_padding.py --reps 5

Each variant runs in a fresh process (benchmarks/harness.py, interleaved rounds): a 6.3M Llama built from config
(hidden 256, 6 layers, 32k vocabulary, random weights) as policy and as critic (a one-label token classifier), 64
sequences, micro-batches of 8; one pass of the update's forwards and backwards (policy log-probabilities, critic
values, a masked loss of each), 4 times over. ``--lengths fixed``: every prompt 48 tokens, every answer 64 (the
embedded task's shape: nothing to cut). ``--lengths varied``: prompts 16-384 tokens and answers 8-192 tokens, drawn
log-uniform (HH-RLHF's and UltraFeedback's prompts spread over that range). Both variants compute the same losses:
the child prints their sum, which must agree (``loss_sum``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Variant, header, interleaved, python, report  # noqa: E402


def child(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    from rlhf_exp.data.encode import pad
    from rlhf_exp.ppo.core import masked_mean
    from rlhf_exp.ppo.trainer import token_logprobs, token_values, trimmed

    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=32768, hidden_size=256, num_hidden_layers=6, intermediate_size=1024,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, max_position_embeddings=1024)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    critic = LlamaForTokenClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))
    g = torch.Generator().manual_seed(1)

    def log_uniform(lo, hi, n):
        return [int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(u))) for u in torch.rand(n, generator=g)]

    n = 64
    if args.lengths == "fixed":
        prompt_lengths, answer_lengths = [48] * n, [64] * n
    else:
        prompt_lengths, answer_lengths = log_uniform(16, 384, n), log_uniform(8, 192, n)
    prompts = [torch.randint(2, 32768, (p,), generator=g).tolist() for p in prompt_lengths]
    ids, attn = pad(prompts, 0, side="left")
    width = max(answer_lengths)
    answers = torch.randint(2, 32768, (n, width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(answer_lengths)[:, None]).float()
    answers = answers * mask.long()  # padding after each answer
    out, full = torch.cat([ids, answers], dim=1), torch.cat([attn, mask.long()], dim=1)
    prompt_len = ids.shape[1]
    lengths = full.sum(1)
    total = 0.0
    for _ in range(4):
        order = torch.arange(n)
        if args.variant == "cut":
            order = order[torch.argsort(lengths[order], stable=True)]
        for idx in order.split(8):
            if args.variant == "cut":
                i, a, p, w = trimmed(out[idx], full[idx], prompt_len, mask[idx])
            else:
                i, a, p, w = out[idx], full[idx], prompt_len, width
            m = mask[idx, :w]
            logprobs, _ = token_logprobs(policy, i, a, p, 1.0, entropy=False)
            values = token_values(critic, i, a, p)
            loss = masked_mean(-logprobs, m, mask.sum()) + masked_mean(values ** 2, m, mask.sum())
            loss.backward()
            total += loss.item()
    print(f"loss_sum={total:.6f}")
    print(f"padding_share={1 - (full.sum().item() / full.numel()):.3f}")


def parse(text: str, _tmp) -> dict:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("loss_sum", "padding_share"):
            out[key] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", choices=["full", "cut"], help=argparse.SUPPRESS)  # a child run
    ap.add_argument("--lengths", choices=["fixed", "varied"], default="varied", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        child(args)
        return 0
    print(header())
    print(f"rounds: {args.reps}; threads: 1 per process; 64 sequences, micro-batches of 8, 4 passes\n")
    me = str(Path(__file__).resolve())
    env = {"OMP_NUM_THREADS": "1"}
    for lengths in ("fixed", "varied"):
        print(f"== {lengths} lengths ==")
        results = interleaved([Variant(v, python(me, "--variant", v, "--lengths", lengths), env, parse=parse)
                               for v in ("full", "cut")], reps=args.reps)
        report(results, baseline="full", extra=("loss_sum", "padding_share"))
        same = all(abs(a["loss_sum"] - b["loss_sum"]) <= 1e-4 * max(1.0, abs(b["loss_sum"]))
                   for a, b in zip(results["cut"], results["full"]))
        print(f"same losses (cut vs full, every round, to 1e-4 relative): {'yes' if same else 'NO'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
