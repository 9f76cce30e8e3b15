"""Which checkpoints are kept: the newest N complete ones plus the best by the recorded metric."""

from __future__ import annotations

from pathlib import Path

from rlhf_exp.tracking.checkpoints import best_unless_final, latest_complete, mark_complete, prune


def make(trainer_dir: Path, step: int, metric: float | None, complete: bool = True) -> Path:
    folder = trainer_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * step)
    if complete:
        mark_complete(folder, step, **({"metric": metric} if metric is not None else {}))
    return folder


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    rewards = {4: 0.1, 8: 0.9, 12: 0.3, 16: 0.2, 20: 0.4}
    for step, reward in rewards.items():
        make(tmp_path, step, reward)
    make(tmp_path, 24, None, complete=False)  # a save under way (newer than every complete one): kept
    make(tmp_path, 2, None, complete=False)  # an old broken one: removed
    (tmp_path / ".checkpoint-28.partial").mkdir()  # left by a killed PPO save: removed
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-16", "checkpoint-20", "checkpoint-24",
                                                          "checkpoint-8"]
    assert latest_complete(tmp_path).name == "checkpoint-20"
    assert best_unless_final(tmp_path, final_step=20).name == "checkpoint-8"
    make(tmp_path, 32, 2.0)
    assert best_unless_final(tmp_path, final_step=32) is None  # the final model is the best one
