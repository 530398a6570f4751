"""GKD: generalized knowledge distillation, on-policy (Agarwal et al., ICLR 2024), as TRL defines it."""
