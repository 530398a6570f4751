"""Delta-KD: Delta Knowledge Distillation for Large Language Models (Cao et al., 2025)."""
