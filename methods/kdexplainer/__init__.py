"""KDExplainer: a task-oriented attention model for explaining knowledge distillation (Xue et al., IJCAI 2021)."""
