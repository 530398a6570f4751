"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025)."""
