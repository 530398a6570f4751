"""DSKD: dual-space knowledge distillation with cross-model attention (Zhang et al., EMNLP 2024)."""
