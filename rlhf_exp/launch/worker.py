"""One worker of a multi-process run on one machine, started by torchrun (see ``distributed.spawn_workers``):
``python -m rlhf_exp.launch.worker <run folder>``. It reads the config the launching process composed
and resolved (never re-running Hydra), then runs the phase like a single-process job does."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from rlhf_exp.cli import EXIT_CONFIG_ERROR, execute
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.launch.distributed import LAUNCH_DIR, mark_failed, rank
    from rlhf_exp.launch.signals import GUARD, Interrupted

    run_dir = Path(argv[0])
    with open(run_dir / LAUNCH_DIR / "config.pkl", "rb") as f:
        launch = pickle.load(f)
    try:
        execute(launch["cfg"], run_dir, launch["resume"])
    except Interrupted as exc:
        GUARD.hand_over(exc, rank(), run_dir)
    except ConfigError as exc:
        print(f"rlhf_exp: error (rank {rank()}): {exc}", file=sys.stderr)
        mark_failed(run_dir, f"rank {rank()}: {exc}")
        return EXIT_CONFIG_ERROR
    except Exception as exc:  # recorded before torchrun stops the other workers (rank 0 may not get to it)
        mark_failed(run_dir, f"rank {rank()}: {type(exc).__name__}: {exc}"[:2000])
        raise
    _leave_together()
    return 0


def _leave_together() -> None:
    """After a phase that ended normally on this process: wait for the others (rank 0 alone still writes the run's
    files and measures gold), then take the process group down in order. A worker that exits while its peers still
    hold their connections can abort in the collective library's teardown (seen once on 2 CPU processes: SIGABRT,
    "terminate called without an active exception"), which torchrun reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
