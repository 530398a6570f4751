"""f-DISTILL: f-divergence minimization for sequence-level knowledge distillation (Wen et al., ACL 2023)."""
