"""PPO's seeded sampler: the right distribution, and a row's sample independent of how rows are split."""

from __future__ import annotations

import torch

from rlhf_exp.ppo.trainer import SeededSampler


def sample(sampler: SeededSampler, logits: torch.Tensor) -> torch.Tensor:
    return sampler(None, logits).argmax(-1)


def test_frequencies_follow_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = SeededSampler(temperature=2.0, seed=0, rows=slice(0, 1), total_rows=1, device="cpu")
    counts = torch.bincount(torch.cat([sample(sampler, logits) for _ in range(20000)]), minlength=4).float()
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.015), (counts / counts.sum(), expected)


def test_a_rows_samples_do_not_depend_on_the_split():
    """Process 0 of 2 holds rows 0-1, process 1 rows 2-3: each gets what one process gets for them."""
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    whole = SeededSampler(1.0, seed=7, rows=slice(0, 4), total_rows=4, device="cpu")
    halves = [SeededSampler(1.0, seed=7, rows=slice(0, 2), total_rows=4, device="cpu"),
              SeededSampler(1.0, seed=7, rows=slice(2, 4), total_rows=4, device="cpu")]
    for _ in range(20):  # 20 decoding steps
        together = sample(whole, logits)
        apart = torch.cat([sample(halves[0], logits[:2]), sample(halves[1], logits[2:])])
        assert torch.equal(together, apart)
