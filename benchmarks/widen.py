"""A benchmark model that costs what a large one costs and answers as the trained demo does.

Random weights make every next token a near tie: a batch shape or a quantization flips them,
so drafts are rarely kept and variants disagree far more than real ones do. The trained demo
model agrees with its variants as real models do (its Q8_0 keeps the top token 98 % of the
time) but is too small to cost anything. :func:`widen` gives the demo's computation a large
model's shape: every matrix is zero-padded (the demo's weights in the top-left corner), the
extra heads, FFN units and layers have all-zero weights, so their outputs are exactly zero,
and the vocabulary is padded with tokens whose output rows are zero.

Why the answers stay the same, exactly up to float rounding:

- the residual stream's extra dimensions start at zero (the embedding's extra columns are
  zero) and stay zero (every matrix writing into the stream has zero rows there);
- RMSNorm divides by the root mean square over all dimensions: with ``w`` of them real out
  of ``W``, the mean shrinks by ``w / W``, which the norm weights (times ``sqrt(w / W)``) and
  ``rms_norm_eps`` (times ``w / W``) undo;
- the head size stays the demo's (more heads, not wider ones), so RoPE and the attention
  scale are unchanged; an extra head's queries, keys and values are zero, and so is its share
  of the attention output; an extra layer adds zero to the stream;
- a padded token's logit is exactly 0 in every variant (its output row quantizes to zero),
  while the demo's top logit is above 10 wherever it answers, so greedy never picks one. They
  do take probability mass, so KL divergences are smaller than the demo's; the top token, and
  so the answers and the same-top share, are unchanged.

The demo's weights sit in whole K-quant blocks (its widths are multiples of 256), so a
quantized wide model quantizes the demo's weights as the demo's own file does.

    .venv/bin/python benchmarks/widen.py build/tiny-demo/tiny-demo-BF16.gguf wide-BF16.gguf
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Shape:
    """The wide model's shape; the head size is the source's."""

    n_embd: int = 1536
    n_ff: int = 4096
    n_layer: int = 12
    n_vocab: int = 102400


#: The 0.65 B DeepSeek-shaped benchmark model's widths (benchmarks/benchsetup.py).
BENCHMARK = Shape()
#: Metadata keys the widening rewrites; every other key is copied as it is.
_SHAPE_KEYS = ("llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
               "llama.attention.head_count", "llama.attention.head_count_kv",
               "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
               "general.size_label", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores")


def _bf16(reader_tensor: object) -> np.ndarray:
    """A BF16 tensor's words as (rows, cols) uint16."""
    data = np.asarray(reader_tensor.data)  # type: ignore[attr-defined]
    return data.view(np.uint16).reshape(data.shape[0], -1)


def _padded(words: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), np.uint16)
    out[: words.shape[0], : words.shape[1]] = words
    return out


def widen(src: Path, dest: Path, shape: Shape = BENCHMARK) -> None:
    """Write ``src`` (a BF16 LLaMA GGUF) widened to ``shape`` into ``dest``."""
    import gguf

    r = gguf.GGUFReader(src)
    get = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    n_embd, n_ff, n_layer = (int(get[f"llama.{k}"]) for k in (
        "embedding_length", "feed_forward_length", "block_count"))
    n_head = int(get["llama.attention.head_count"])
    head = n_embd // n_head
    tokens = list(get["tokenizer.ggml.tokens"])
    if shape.n_embd % head or shape.n_embd < n_embd or shape.n_ff < n_ff \
            or shape.n_layer < n_layer or shape.n_vocab < len(tokens):
        raise SystemExit(f"{shape} cannot hold {src.name} ({n_embd}/{n_ff}/{n_layer}, "
                         f"{len(tokens)} tokens, heads of {head})")
    share = n_embd / shape.n_embd
    w = gguf.GGUFWriter(dest, "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in _SHAPE_KEYS or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_block_count(shape.n_layer)
    w.add_head_count(shape.n_embd // head)
    w.add_head_count_kv(shape.n_embd // head)
    w.add_layer_norm_rms_eps(float(get["llama.attention.layer_norm_rms_epsilon"]) * share)
    w.add_vocab_size(shape.n_vocab)
    n_pad = shape.n_vocab - len(tokens)
    w.add_token_list(tokens + [f"<|widen_pad_{i}|>" for i in range(n_pad)])
    types = list(get["tokenizer.ggml.token_type"])
    w.add_token_types(types + [int(gguf.TokenType.UNUSED)] * n_pad)
    if "tokenizer.ggml.scores" in get:
        w.add_token_scores(list(get["tokenizer.ggml.scores"]) + [0.0] * n_pad)

    by_name = {t.name: t for t in r.tensors}
    bf16 = gguf.GGMLQuantizationType.BF16

    def matrix(name: str, rows: int, cols: int) -> None:
        source = by_name.get(name)
        words = (_padded(_bf16(source), rows, cols) if source is not None
                 else np.zeros((rows, cols), np.uint16))
        w.add_tensor(name, words.view(np.uint8), raw_dtype=bf16)

    def norm(name: str) -> None:
        source = by_name.get(name)
        out = np.zeros(shape.n_embd, np.float32)
        if source is not None:
            out[:n_embd] = np.asarray(source.data, np.float32) * math.sqrt(share)
        w.add_tensor(name, out)

    matrix("token_embd.weight", shape.n_vocab, shape.n_embd)
    for i in range(shape.n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            matrix(f"blk.{i}.attn_{part}.weight", shape.n_embd, shape.n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
    norm("output_norm.weight")
    matrix("output.weight", shape.n_vocab, shape.n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the demo's BF16 GGUF (mathq convert)")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--embd", type=int, default=BENCHMARK.n_embd)
    ap.add_argument("--ff", type=int, default=BENCHMARK.n_ff)
    ap.add_argument("--layers", type=int, default=BENCHMARK.n_layer)
    ap.add_argument("--vocab", type=int, default=BENCHMARK.n_vocab)
    args = ap.parse_args()
    widen(args.src, args.dest, Shape(args.embd, args.ff, args.layers, args.vocab))


if __name__ == "__main__":
    main()
