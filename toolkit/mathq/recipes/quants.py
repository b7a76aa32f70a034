"""Every quantization type llama-cpp-python 0.3.36 can produce: the one table.

Choices in ``--help``, recipe validation, file names, the README's table and the report's
bits-per-weight column all derive from :data:`QUANT_TYPES`. The ftype numbers are
``enum llama_ftype`` in llama.cpp's ``include/llama.h``; ``requires_imatrix`` follows
``tensor_requires_imatrix`` in ``src/llama-quant.cpp`` (tests check both against llama.cpp);
``imatrix_helps`` marks the types ``mathq build --imatrix`` also makes with an importance matrix.
``bpw`` is the nominal bits per weight of the type's main tensor type; mixes such as Q4_K_M
keep some tensors at higher precision, so files come out a little larger (the report
measures the real figure).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from mathq.errors import MathqError


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp output file type.

    ``imatrix_helps``: an importance matrix is worth computing for this type. llama.cpp's
    quantizer spends a type's few levels where the matrix says activations are large; the
    fewer the bits, the more a wrongly placed level costs, so the gain is largest at 4 bits
    and below (llama-quantize's README: imatrix files minimise the loss; PR 4861 and its
    follow-ups measured it on k- and i-quants). It is set for the k- and i-quants up to
    about 4.5 bits per weight (Q2_K, Q3_K_*, Q4_K_*, IQ*) and for every type that requires a
    matrix; Q5_K and up lose little without one, and the legacy and ternary types are kept
    for compatibility, not tuned.
    """

    name: str
    ftype: int
    bpw: float
    description: str
    requires_imatrix: bool = False
    family: str = "legacy"
    imatrix_helps: bool = False

    @property
    def is_float(self) -> bool:
        """Unquantized types (F32, F16, BF16): what conversion writes, not quantization."""
        return self.family == "float"


QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("F32", 0, 32.0, "32-bit float; twice BF16's size, no gain for bf16 checkpoints",
              family="float"),
    QuantType("F16", 1, 16.0, "16-bit float; lossless only if weights fit F16's range",
              family="float"),
    QuantType("BF16", 32, 16.0, "bfloat16; lossless for DeepSeek-Math's bf16 weights, the "
              "reference", family="float"),
    QuantType("Q8_0", 7, 8.5, "8-bit round-to-nearest; practically indistinguishable from BF16"),
    QuantType("Q6_K", 18, 6.5625, "6-bit k-quant; near-lossless at 3/4 of Q8_0's size",
              family="k"),
    QuantType("Q5_K_M", 17, 5.5, "5-bit k-quant, medium mix (attn_v, ffn_down partly Q6_K)",
              family="k"),
    QuantType("Q5_K_S", 16, 5.5, "5-bit k-quant, small mix", family="k"),
    QuantType("Q5_1", 9, 6.0, "5-bit legacy with offset; superseded by Q5_K"),
    QuantType("Q5_0", 8, 5.5, "5-bit legacy; superseded by Q5_K"),
    QuantType("Q4_K_M", 15, 4.5, "4-bit k-quant, medium mix; the usual default download",
              family="k", imatrix_helps=True),
    QuantType("Q4_K_S", 14, 4.5, "4-bit k-quant, small mix", family="k", imatrix_helps=True),
    QuantType("Q4_1", 3, 5.0, "4-bit legacy with offset; superseded by Q4_K"),
    QuantType("Q4_0", 2, 4.5, "4-bit legacy; fast on ARM through runtime repacking"),
    QuantType("IQ4_XS", 30, 4.25, "4-bit non-linear i-quant, super-blocks; best 4-bit per byte",
              family="i", imatrix_helps=True),
    QuantType("IQ4_NL", 25, 4.5, "4-bit non-linear i-quant, 32-weight blocks", family="i",
              imatrix_helps=True),
    QuantType("Q3_K_L", 13, 3.4375, "3-bit k-quant, large mix (attn_v, ffn_down at Q5_K)",
              family="k", imatrix_helps=True),
    QuantType("Q3_K_M", 12, 3.4375, "3-bit k-quant, medium mix", family="k",
              imatrix_helps=True),
    QuantType("Q3_K_S", 11, 3.4375, "3-bit k-quant, small mix", family="k",
              imatrix_helps=True),
    QuantType("IQ3_M", 27, 3.4375, "3-bit i-quant mix; an importance matrix helps", family="i",
              imatrix_helps=True),
    QuantType("IQ3_S", 26, 3.4375, "3.44-bit i-quant; an importance matrix helps", family="i",
              imatrix_helps=True),
    QuantType("IQ3_XS", 22, 3.3, "3.3-bit i-quant mix (some tensors IQ3_XXS)",
              requires_imatrix=True, family="i", imatrix_helps=True),
    QuantType("IQ3_XXS", 23, 3.0625, "3.06-bit i-quant", requires_imatrix=True, family="i",
              imatrix_helps=True),
    QuantType("Q2_K", 10, 2.625, "2-bit k-quant mix; large quality loss on 7B models",
              family="k", imatrix_helps=True),
    QuantType("Q2_K_S", 21, 2.625, "2-bit k-quant, small mix", requires_imatrix=True,
              family="k", imatrix_helps=True),
    QuantType("IQ2_M", 29, 2.5, "2.7-bit i-quant mix", requires_imatrix=True, family="i",
              imatrix_helps=True),
    QuantType("IQ2_S", 28, 2.5, "2.5-bit i-quant", requires_imatrix=True, family="i",
              imatrix_helps=True),
    QuantType("IQ2_XS", 20, 2.3125, "2.31-bit i-quant", requires_imatrix=True, family="i",
              imatrix_helps=True),
    QuantType("IQ2_XXS", 19, 2.0625, "2.06-bit i-quant", requires_imatrix=True, family="i",
              imatrix_helps=True),
    QuantType("IQ1_M", 31, 1.75, "1.75-bit i-quant; mostly for experiments",
              requires_imatrix=True, family="i", imatrix_helps=True),
    QuantType("IQ1_S", 24, 1.5625, "1.56-bit i-quant; mostly for experiments",
              requires_imatrix=True, family="i", imatrix_helps=True),
    QuantType("Q2_0", 41, 2.25, "2-bit round-to-nearest, 64-weight groups"),
    QuantType("Q1_0", 40, 1.125, "1-bit sign quantization; only for models trained for it"),
    QuantType("TQ2_0", 37, 2.0625, "ternary 2-bit; only for ternary-trained (BitNet) models",
              family="ternary"),
    QuantType("TQ1_0", 36, 1.6875, "ternary 1.69-bit; only for ternary-trained (BitNet) models",
              family="ternary"),
)

_BY_NAME = {q.name.upper(): q for q in QUANT_TYPES}

# llama-quantize's short aliases for the medium k-quant mixes.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

QUANT_NAMES: tuple[str, ...] = tuple(q.name for q in QUANT_TYPES)
QUANTIZED_NAMES: tuple[str, ...] = tuple(q.name for q in QUANT_TYPES if not q.is_float)


class UnknownQuantError(MathqError, ValueError):
    """A name that is not in :data:`QUANT_TYPES`."""

    exit_code = 2


def get_quant(name: str) -> QuantType:
    """Look a type up by name, case-insensitively, accepting llama-quantize's aliases."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key in _BY_NAME:
        return _BY_NAME[key]
    close = difflib.get_close_matches(key, list(_BY_NAME), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else "run `mathq quants` for the list"
    raise UnknownQuantError(f"unknown quantization type {name!r}", hint)


def parse_quant_list(text: str) -> tuple[QuantType, ...]:
    """Parse ``Q4_K_M,Q5_K_M`` into types, keeping order and dropping repeats."""
    seen: dict[str, QuantType] = {}
    for part in text.split(","):
        if part.strip():
            q = get_quant(part)
            seen.setdefault(q.name, q)
    if not seen:
        raise UnknownQuantError("no quantization type given", "e.g. --quant Q4_K_M,Q5_K_M")
    return tuple(seen.values())


def by_ftype(ftype: int) -> QuantType | None:
    """The type a GGUF's ``general.file_type`` names, or None for one this table lacks."""
    return next((q for q in QUANT_TYPES if q.ftype == ftype), None)


IMATRIX_SUFFIX = "-imat"
"""Ends the name of a variant quantized with the build's importance matrix (``Q4_K_M-imat``),
so that it lives beside the plain variant (``<model>-Q4_K_M-imat.gguf``, ``kld/Q4_K_M-imat.json``)
and the report can compare the two."""


TUNED_SUFFIX = "-tuned"
"""Ends the name of the variant ``mathq tune --match QUANT`` makes: the type's stock size with
the tensor types chosen by measured KL divergence (``Q4_K_M-tuned``, ``Q4_K_M-imat-tuned``)."""


@dataclass(frozen=True)
class Variant:
    """A variant of a build: a quantization type, made with an importance matrix or not,
    as llama.cpp's stock mix or tuned to the stock mix's size (``mathq tune``).

    :attr:`name` is what every file of the variant is named after, and what ``--quant``
    options and the report call it.
    """

    quant: QuantType
    imatrix: bool = False
    tuned: bool = False

    @property
    def name(self) -> str:
        """``Q4_K_M``, ``Q4_K_M-imat``, ``Q4_K_M-tuned`` or ``Q4_K_M-imat-tuned``."""
        return (self.quant.name + (IMATRIX_SUFFIX if self.imatrix else "")
                + (TUNED_SUFFIX if self.tuned else ""))


def parse_variant(name: str) -> Variant:
    """``Q4_K_M-imat`` -> Variant(Q4_K_M, imatrix=True), ``Q4_K_M-tuned`` -> Variant(Q4_K_M,
    tuned=True); plain names as :func:`get_quant`.

    The one place that reads a variant name, so that a suffix means the same thing in every
    command and in the report.
    """
    key = name.strip()
    tuned = key.lower().endswith(TUNED_SUFFIX)
    key = key[: -len(TUNED_SUFFIX)] if tuned else key
    imatrix = key.lower().endswith(IMATRIX_SUFFIX)
    quant = get_quant(key[: -len(IMATRIX_SUFFIX)] if imatrix else key)
    if (imatrix or tuned) and quant.is_float:
        kind, suffix = ("importance-matrix", IMATRIX_SUFFIX) if imatrix else ("tuned",
                                                                            TUNED_SUFFIX)
        raise UnknownQuantError(f"{name.strip()!r}: {quant.name} is not quantized, so it has no "
                                f"{kind} variant",
                                f"use {quant.name}, or a quantized type with {suffix}")
    return Variant(quant, imatrix, tuned)


def making_command(recipe: str, variant: str) -> str:
    """The command that makes ``variant``'s file for ``recipe`` (a recipe's name or path):
    ``mathq convert`` for the full-precision file, ``mathq tune`` for a tuned one, else
    ``mathq quantize``; the one place every "make it first" hint comes from."""
    v = parse_variant(variant)
    if v.quant.is_float:
        return f"mathq convert {recipe}"
    if v.tuned:
        matrix = " --imatrix FILE" if v.imatrix else ""
        return f"mathq tune {recipe} --match {v.quant.name}{matrix}"
    return f"mathq quantize {recipe} --quant {v.name}"


def parse_variant_list(text: str) -> tuple[Variant, ...]:
    """Parse ``Q4_K_M,Q4_K_M-imat`` into variants, keeping order and dropping repeats."""
    seen: dict[str, Variant] = {}
    for part in text.split(","):
        if part.strip():
            v = parse_variant(part)
            seen.setdefault(v.name, v)
    if not seen:
        raise UnknownQuantError("no quantization type given", "e.g. --quant Q4_K_M,Q5_K_M")
    return tuple(seen.values())


def variant_names(quant: QuantType) -> tuple[str, ...]:
    """The names a type's variants can have in a build folder: plain, with a matrix, tuned
    (``mathq tune --match``) and both."""
    if quant.is_float:
        return (quant.name,)
    return tuple(Variant(quant, imatrix, tuned).name
                 for tuned in (False, True) for imatrix in (False, True))


def ggml_type_id(name: str) -> int:
    """A ggml tensor type's enum value by name (``q6_k`` -> 14), from gguf's own table."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.strip().upper()])
    except KeyError:
        names = ", ".join(t.name for t in GGMLQuantizationType)
        raise UnknownQuantError(f"unknown ggml tensor type {name!r}",
                                f"use one of {names}") from None
