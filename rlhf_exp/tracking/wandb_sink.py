"""Mirror a run's metrics and resolved config to Weights & Biases, never at the cost of training.

With ``logger.mode=auto`` the run is online when an API key is available (WANDB_API_KEY or a
``wandb login`` netrc entry) and offline otherwise, said once. Any W&B error is reported once and
W&B logging stops; the run folder's own files are unaffected.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

_warned_offline = False


def secret_on_command_line() -> bool:
    import sys

    from rlhf_exp.tracking.secrets import scrub

    line = " ".join(sys.argv)
    return scrub(line) != line


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _say(message: str) -> None:
    print(f"rlhf_exp: W&B: {message}", file=sys.stderr)


class WandbSink:
    def __init__(self, logger_cfg, run_id: str, run_dir: Path, config: dict[str, Any], resume: bool = False):
        global _warned_offline
        self.run = None
        mode = logger_cfg.mode
        if mode == "auto":
            mode = "online" if has_api_key() else "offline"
            if mode == "offline" and not _warned_offline:
                _warned_offline = True
                _say(f"no API key found, logging offline to {run_dir / 'wandb'}; upload later with "
                     f"`wandb sync {run_dir / 'wandb'}/offline-run-*`")
        try:
            import wandb

            self.run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=logger_cfg.group,
                tags=list(logger_cfg.tags),
                name=run_id,
                # the W&B run's id is the run id: a resumed run continues the same W&B run (steps it
                # logs again after its checkpoint, W&B already has, with the same values)
                id=run_id,
                resume="allow" if resume else None,
                dir=str(run_dir),
                config=config,
                mode=mode,
                # W&B's run metadata records the command line: left out when a secret is on it
                settings=wandb.Settings(silent=True, console="off", x_disable_meta=secret_on_command_line()),
            )
        except Exception as exc:  # W&B must never stop training
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        if self.run is not False:
            _say(f"disabled after an error ({type(exc).__name__}: {exc}); training continues, "
                 "metrics stay in metrics.jsonl")
        self.run = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:
            self._disable(exc)

    def summary(self, metrics: dict[str, Any]) -> None:
        if not self.run:
            return
        try:
            for key, value in metrics.items():
                self.run.summary[key] = value
        except Exception as exc:
            self._disable(exc)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (the health monitor's alarms: rlhf_exp.monitor). An alert W&B refuses (offline runs have
        no alerts) is said once; logging carries on."""
        if not self.run or getattr(self, "_alerts_off", False):
            return
        try:
            import wandb

            self.run.alert(title=title[:64], text=text, level=wandb.AlertLevel.WARN)
        except Exception as exc:
            self._alerts_off = True
            _say(f"alerts off after an error ({type(exc).__name__}: {exc}); the alarm is in summary.json")

    def close(self, failed: bool) -> None:
        if not self.run:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:
            self._disable(exc)
