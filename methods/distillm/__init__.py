"""DistiLLM: skew KL divergences and adaptive off-policy student generations (Ko et al., ICML 2024)."""
