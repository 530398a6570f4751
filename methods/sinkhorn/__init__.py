"""SinKD: Sinkhorn Distance Minimization for Knowledge Distillation (Cui et al., LREC-COLING 2024)."""
