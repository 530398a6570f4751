"""MiniLLM: knowledge distillation of large language models by reverse KL and policy gradient (Gu et al., ICLR 2024)."""
