"""``config.json`` -> the hyperparameters a LLaMA-architecture GGUF needs, or a clear refusal.

Only ``LlamaForCausalLM`` checkpoints of the plain kind are converted: DeepSeek-Math's
layout (multi-head attention, no biases, SiLU, no RoPE scaling) and Llama-style models
with grouped-query attention. Anything that would need a different graph in llama.cpp is
refused by name here, before any byte is written, rather than turned into a file that
loads but computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.errors import CheckpointError, InputFileError, shorten
from mathq.inputs import UnreadableInput, file_problem, finite, parse_json, read_text

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class LlamaHParams:
    """What the converter reads from ``config.json`` (names as llama.cpp's keys use them)."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    n_vocab: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    torch_dtype: str | None

    @property
    def n_q(self) -> int:
        """Rows of the query projection."""
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        """Rows of the key and value projections."""
        return self.n_head_kv * self.head_dim

    def dim(self, symbol: str) -> int:
        """The size a tensor-map shape symbol (``n_embd``, ``n_q``, ...) stands for."""
        value = getattr(self, symbol)
        if not isinstance(value, int):
            raise AttributeError(symbol)
        return value


#: The largest JSON file a checkpoint holds is its tokenizer (a few megabytes at 100k tokens).
CHECKPOINT_JSON_LIMIT = 256 << 20

#: A context far beyond any model's: llama.cpp sizes caches from it.
MAX_CONTEXT = 1 << 24

#: GGUF stores counts (context length, heads, ...) as uint32.
_UINT32_MAX = 2**32 - 1


def read_checkpoint_json(path: Path, hint: str) -> Any:
    """Parse one of a checkpoint's JSON files (config, tokenizer, shard index).

    Every reader of the converter reports an unreadable, non-UTF-8 or malformed file the same
    way, as one CheckpointError naming the file and the cause; ``hint`` says how to get a
    good copy.
    """
    try:
        return parse_json(read_text(path, CHECKPOINT_JSON_LIMIT))
    except UnreadableInput as e:
        raise CheckpointError(f"cannot read {e.describe(path)}", hint) from None


def load_config(hf_dir: Path) -> dict[str, Any]:
    """Read ``config.json`` as a dict, or raise naming the file."""
    path = Path(hf_dir) / "config.json"
    if (problem := file_problem(path)) is not None:
        where = f"no config.json in {hf_dir}" if problem == "does not exist" \
            else f"{path} {problem}"
        raise InputFileError(
            where, "point at a Hugging Face model folder (config.json, tokenizer, *.safetensors)")
    data = read_checkpoint_json(path, "download the checkpoint again")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object", "download the checkpoint again")
    return data


def parse_hparams(config: dict[str, Any], path: Path) -> LlamaHParams:
    """Validate a LLaMA ``config.json``; refuse, by name, what mathq cannot convert."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else None
    if arch not in SUPPORTED_ARCHITECTURES:
        shown = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else "none"
        raise CheckpointError(
            f"unsupported architecture {shown} in {path}",
            f"mathq converts {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints; use llama.cpp's "
            "convert_hf_to_gguf.py for others",
        )

    def need(key: str, default: int | None = None) -> int:
        """A positive integer GGUF can store (as uint32)."""
        value = config.get(key)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"{path}: {key} must be a positive integer, got {shorten(repr(value), 40)}",
                "fix or re-download config.json",
            )
        if value > _UINT32_MAX:
            raise CheckpointError(f"{path}: {key} {shorten(str(value), 40)} is more than GGUF "
                                  "can store (2^32 - 1)", "fix or re-download config.json")
        return value

    def positive(key: str, default: float, high: float) -> float:
        """A positive, finite hyper-parameter up to ``high``: llama.cpp divides and takes
        roots with it, so a NaN, a negative or an absurd value converts into a model that
        computes NaN."""
        value = config.get(key)
        if value is None:
            value = default
        if not finite(value) or not 0 < value <= high:
            raise CheckpointError(
                f"{path}: {key} must be a number above 0 and at most {high:g}, got "
                f"{shorten(repr(value), 40)}", "fix or re-download config.json",
            )
        return float(value)

    def refuse(feature: str) -> None:
        raise CheckpointError(
            f"{path}: {feature} is not supported by mathq's converter",
            "use llama.cpp's convert_hf_to_gguf.py for this checkpoint",
        )

    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        refuse(f"rope_scaling {rope!r}")
    if (kind := rope.get("rope_type") or rope.get("type")) not in (None, "default"):
        refuse(f"rope_scaling type {kind!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        refuse("attention_bias/mlp_bias")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {config.get('hidden_act')!r}")

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if n_head > n_embd:
        raise CheckpointError(f"{path}: num_attention_heads {n_head} is more than hidden_size "
                              f"{n_embd}", "fix or re-download config.json")
    n_head_kv = need("num_key_value_heads", n_head)
    head_dim = need("head_dim", max(n_embd // n_head, 1))
    if n_head % n_head_kv:
        raise CheckpointError(
            f"{path}: num_attention_heads {n_head} is not a multiple of "
            f"num_key_value_heads {n_head_kv}",
            "fix config.json",
        )
    if head_dim % 2:
        raise CheckpointError(
            f"{path}: head dimension {head_dim} is odd; RoPE needs it even", "fix config.json"
        )
    # Defaults as transformers' LlamaConfig fills them in: llama.cpp's converter reads the
    # config through AutoConfig, so it always writes these keys, and so does mathq.
    n_ctx = need("max_position_embeddings", 2048)
    if n_ctx > MAX_CONTEXT:
        raise CheckpointError(f"{path}: max_position_embeddings {n_ctx} is more than any "
                              f"model's context ({MAX_CONTEXT})", "fix or re-download config.json")
    eps = positive("rms_norm_eps", 1e-6, 1.0)
    theta = positive("rope_theta", rope.get("rope_theta") or 10000.0, 1e8)
    return LlamaHParams(
        architecture=arch,
        n_layer=need("num_hidden_layers"),
        n_embd=n_embd,
        n_ff=need("intermediate_size"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=n_ctx,
        n_vocab=need("vocab_size"),
        rms_norm_eps=eps,
        rope_theta=theta,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
    )


def load_hparams(hf_dir: Path) -> LlamaHParams:
    """``parse_hparams`` of ``<hf_dir>/config.json``."""
    return parse_hparams(load_config(hf_dir), Path(hf_dir) / "config.json")
