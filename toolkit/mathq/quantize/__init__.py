"""Stage 3, quantize: llama.cpp's quantizer, importance matrices and their calibration text."""
