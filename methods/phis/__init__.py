"""PHI-S: distribution balancing for label-free multi-teacher distillation (Ranzinger et al., 2024)."""
