"""Stage 2, convert: Hugging Face LLaMA checkpoints (DeepSeek-Math) to GGUF, streaming, lossless,
verified.

Library entry point: :func:`mathq.convert.converter.convert_checkpoint`; the build step is
:mod:`mathq.convert.stage`. Modules, one job each: ``safetensors_reader`` (validated mmap
reader), ``checkpoint`` (shards and index), ``hfconfig`` (config.json), ``tensor_map`` (the
name/shape/permute table), ``vocab`` (tokenizer.ggml.*), ``writer`` (streaming GGUF),
``verify`` (reader + llama.cpp checks), ``gguf_info`` (the one GGUF header reader, used by
every later stage).
"""
