"""Distillation scaling laws (Busbridge et al., ICML 2025): the laws, their fit and a grid of tiny models."""
