"""DPKD: direct preference knowledge distillation (Li et al., 2024)."""
