"""Defaults of the kld stage, in a module light enough for ``mathq --help`` to import."""

from __future__ import annotations

# llama-perplexity's default context for perplexity and KL divergence; half of each chunk
# is context, the other half is scored.
DEFAULT_CTX = 512
# The variants a reference pass can run on: BF16 is lossless for DeepSeek-Math's weights;
# Q8_0 needs half the memory and is itself within about 0.001 nats of BF16 on 7B models.
REFERENCE_CHOICES = ("BF16", "Q8_0")
