"""DNKD: decoupled non-parametric knowledge distillation for end-to-end speech translation."""
