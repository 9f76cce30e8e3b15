"""rlhf_exp: RLHF experiments (SFT, reward model, PPO, DPO) driven by composable Hydra configs."""

__version__ = "0.1.0"
