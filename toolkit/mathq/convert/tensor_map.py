"""Hugging Face LLaMA tensor names -> GGUF tensor names, shapes and transforms, as data.

This table is the one place that says which tensors a LLaMA checkpoint has, what llama.cpp
calls them, what shape each must have and which rows must be reordered. GGUF names come
from gguf-py's own ``TENSOR_NAMES`` (llama.cpp's source of truth), so only the pairing lives
here. ``{bid}`` stands for the block (layer) number.

The query and key projections are permuted: Hugging Face applies RoPE to the two halves of
each head ("rotate half"), llama.cpp to adjacent pairs of dimensions, so each head's rows
``[0, h/2) and [h/2, h)`` are interleaved. Keys use the number of key/value heads (GQA).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from mathq.convert.hfconfig import LlamaHParams
from mathq.errors import CheckpointError


class Transform(enum.Enum):
    """What happens to a tensor's rows on the way into GGUF."""

    COPY = "copy"
    PERMUTE_Q = "permute_q"
    PERMUTE_K = "permute_k"


@dataclass(frozen=True)
class TensorRule:
    """One row of the map: HF name pattern, GGUF tensor, expected shape, transform."""

    hf: str
    gguf: MODEL_TENSOR
    shape: tuple[str, ...]
    transform: Transform = Transform.COPY


# Shapes are in Hugging Face (row-major, NumPy) order; symbols are LlamaHParams fields.
LLAMA_TENSORS: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", MODEL_TENSOR.TOKEN_EMBD, ("n_vocab", "n_embd")),
    TensorRule("model.layers.{bid}.input_layernorm.weight", MODEL_TENSOR.ATTN_NORM, ("n_embd",)),
    TensorRule(
        "model.layers.{bid}.self_attn.q_proj.weight",
        MODEL_TENSOR.ATTN_Q,
        ("n_q", "n_embd"),
        Transform.PERMUTE_Q,
    ),
    TensorRule(
        "model.layers.{bid}.self_attn.k_proj.weight",
        MODEL_TENSOR.ATTN_K,
        ("n_kv", "n_embd"),
        Transform.PERMUTE_K,
    ),
    TensorRule(
        "model.layers.{bid}.self_attn.v_proj.weight", MODEL_TENSOR.ATTN_V, ("n_kv", "n_embd")
    ),
    TensorRule(
        "model.layers.{bid}.self_attn.o_proj.weight", MODEL_TENSOR.ATTN_OUT, ("n_embd", "n_q")
    ),
    TensorRule(
        "model.layers.{bid}.post_attention_layernorm.weight", MODEL_TENSOR.FFN_NORM, ("n_embd",)
    ),
    TensorRule(
        "model.layers.{bid}.mlp.gate_proj.weight", MODEL_TENSOR.FFN_GATE, ("n_ff", "n_embd")
    ),
    TensorRule("model.layers.{bid}.mlp.up_proj.weight", MODEL_TENSOR.FFN_UP, ("n_ff", "n_embd")),
    TensorRule(
        "model.layers.{bid}.mlp.down_proj.weight", MODEL_TENSOR.FFN_DOWN, ("n_embd", "n_ff")
    ),
    TensorRule("model.norm.weight", MODEL_TENSOR.OUTPUT_NORM, ("n_embd",)),
    TensorRule("lm_head.weight", MODEL_TENSOR.OUTPUT, ("n_vocab", "n_embd")),
)

# Present in some checkpoints, never needed: llama.cpp computes RoPE frequencies itself.
IGNORED = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)


@dataclass(frozen=True)
class MappedTensor:
    """A checkpoint tensor's place in the GGUF file."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    transform: Transform
    n_head: int


def expected_tensors(hp: LlamaHParams) -> dict[str, MappedTensor]:
    """Every tensor a checkpoint with these hyperparameters must hold, by HF name."""
    out: dict[str, MappedTensor] = {}
    for rule in LLAMA_TENSORS:
        if rule.gguf is MODEL_TENSOR.OUTPUT and hp.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the output head is tied
        n_head = hp.n_head_kv if rule.transform is Transform.PERMUTE_K else hp.n_head
        shape = tuple(hp.dim(s) for s in rule.shape)
        blocks = range(hp.n_layer) if "{bid}" in rule.hf else [None]
        for bid in blocks:
            hf = rule.hf.format(bid=bid)
            name = TENSOR_NAMES[rule.gguf].format(bid=bid) + ".weight"
            out[hf] = MappedTensor(hf, name, shape, rule.transform, n_head)
    return out


def is_ignored(hf_name: str, n_layer: int) -> bool:
    """True for tensors that are dropped on purpose (see :data:`IGNORED`)."""
    m = _LAYER.match(hf_name)
    return m is not None and int(m.group(1)) < n_layer and any(
        hf_name == p.format(bid=int(m.group(1))) for p in IGNORED)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_against_tensors(hp: LlamaHParams, found: dict[str, tuple[int, ...]],
                                 where: str) -> None:
    """Refuse a config.json whose sizes its own weights do not have, before any work.

    The sizes that drive loops and allocations (layers, vocabulary, width) are checked
    against the tensors' shapes first: a config claiming 10^12 layers would otherwise spin
    building the tensor plan, and one claiming 2^40 tokens would allocate the vocabulary.
    """
    layers = {int(m.group(1)) for name in found if (m := _LAYER.match(name))}
    n_found = max(layers) + 1 if layers else 0
    if hp.n_layer != n_found or len(layers) != n_found:
        held = f"{len(layers)} layers" + (f" (numbered up to {n_found - 1})"
                                          if len(layers) != n_found else "")
        raise CheckpointError(
            f"config.json says num_hidden_layers is {hp.n_layer}, the weights in {where} "
            f"hold {held}", "config.json and the weights must belong together; download the "
            "checkpoint again")
    embed = LLAMA_TENSORS[0].hf
    if embed not in found:
        raise CheckpointError(f"tensor {embed} is missing from {where}",
                              "download the checkpoint again")
    want = (hp.n_vocab, hp.n_embd)
    if tuple(found[embed]) != want:
        raise CheckpointError(
            f"tensor {embed} has shape {list(found[embed])}, config.json implies {list(want)} "
            "(vocab_size, hidden_size)",
            "config.json and the weights must belong together; download the checkpoint again")


def match_tensors(
    hp: LlamaHParams, found: dict[str, tuple[int, ...]], where: str
) -> list[MappedTensor]:
    """Check the checkpoint's tensor names and shapes against the map; return its plan.

    ``found`` maps each tensor in the checkpoint to its shape. Missing, unexpected or
    misshapen tensors are refused with the first offender's name.
    """
    check_config_against_tensors(hp, found, where)
    expected = expected_tensors(hp)
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]} is missing from {where} ({len(missing)} missing in all)",
            "download the checkpoint again; config.json and the weights must belong together",
        )
    for name, shape in found.items():
        if name in expected:
            if tuple(shape) != expected[name].shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(shape)}, config.json implies "
                    f"{list(expected[name].shape)}",
                    "config.json and the weights do not belong together",
                )
        elif not is_ignored(name, hp.n_layer):
            raise CheckpointError(
                f"unexpected tensor {name} in {where}",
                "mathq converts plain LLaMA checkpoints only",
            )
    return [expected[n] for n in found if n in expected]


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved one.

    Works on raw storage of any element type (BF16 words included): it only moves rows.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
