"""alignpipe: pretrain -> SFT -> reward model -> PPO / DPO."""

__version__ = "0.1.0"
