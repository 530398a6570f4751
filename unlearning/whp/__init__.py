"""Targeted unlearning: Who's Harry Potter and its causal-intervention variant (see README.md)."""
