"""Learning with a constrained weight distribution (Zhong et al., NeurIPS 2022): OT-constrained perceptron."""
