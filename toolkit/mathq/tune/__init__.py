"""Tune: the quantization mix with the lowest measured KL divergence under a byte budget."""
