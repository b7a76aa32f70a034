"""Stage 5, evaluate: smoke tests (MATH accuracy), speed benches and KL divergence against BF16."""
