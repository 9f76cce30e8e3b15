"""A NaN/inf training loss stops the run with the steps it happened in, instead of training on."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rlhf_exp.tracking.hf_callback import RunLogCallback


class _Run:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_stops_training_naming_the_steps(bad):
    run = _Run()
    callback = RunLogCallback(run)
    args = SimpleNamespace(logging_steps=8, learning_rate=3e-3, max_grad_norm=1.0)
    state = SimpleNamespace(global_step=8, is_world_process_zero=True)
    callback.on_log(args, state, None, logs={"loss": 2.5})
    state.global_step = 16
    with pytest.raises(FloatingPointError, match=rf"train loss is {bad} in the steps 9-16: training stopped .* "
                                                 r"Lower phase.learning_rate=0.003 or phase.max_grad_norm=1"):
        callback.on_log(args, state, None, logs={"loss": bad})
    assert run.logged == [(8, {"train/loss": 2.5})]  # the bad value is not recorded as a metric


def test_trainer_logs_show_nonfinite_losses(compose, tmp_path):
    """transformers averages NaN/inf losses away in its logs by default; ours must see them."""
    from omegaconf import OmegaConf

    from rlhf_exp.launch.trl_args import training_kwargs

    assert training_kwargs(OmegaConf.to_object(compose([])), tmp_path, True)["logging_nan_inf_filter"] is False
