"""rlhf_exp's own PPO (TRL >= 1.14 ships none): pure pieces in core.py; the trainer arrives with issue #3."""
