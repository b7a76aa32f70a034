"""Stage 1, download: a recipe's Hugging Face checkpoint into ``build/<model>/hf/``, verified."""
