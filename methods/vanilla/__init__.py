"""Vanilla baselines: SFT, word-level KD with any core divergence, and SeqKD."""
