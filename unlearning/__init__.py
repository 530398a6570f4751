"""Unlearning: a model trained toward what it would have said had it never known the target (unlearning/whp)."""
