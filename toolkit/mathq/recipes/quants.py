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
import re
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


BUDGET_PREFIX = "T"
"""Starts the name of a variant tuned to a bits-per-weight budget (``mathq tune --bpw 4.85``,
or ``--size`` over the model's weights): ``T4.85``, ``T4.85-imat``. No stock mix is named so;
the tune chooses its tensor types, and so its file type."""

_BUDGET_NAME = re.compile(r"^T(\d{1,2}(?:\.\d+)?)$", re.IGNORECASE)

#: The stock mix a budget's whole bits are named for: a ``T4.85`` file is compared with the
#: 4-bit files, and its stock neighbour is Q4_K_M.
_CLASS_TYPE = {1: "Q2_K", 2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K",
               7: "Q6_K"}


@dataclass(frozen=True)
class Variant:
    """A variant of a build: a quantization type, made with an importance matrix or not,
    as llama.cpp's stock mix or tuned (``mathq tune``), to the stock mix's size or to a
    bits-per-weight budget ``bpw`` (then ``quant`` is the stock mix of its size class).

    :attr:`name` is what every file of the variant is named after, and what ``--quant``
    options and the report call it.
    """

    quant: QuantType
    imatrix: bool = False
    tuned: bool = False
    bpw: float | None = None

    @classmethod
    def budget(cls, bpw: float, imatrix: bool = False) -> Variant:
        """The tuned variant of a bits-per-weight budget, named to two decimals."""
        bpw = round(bpw, 2)
        return cls(get_quant(_CLASS_TYPE.get(int(bpw), "Q8_0")), imatrix, tuned=True, bpw=bpw)

    @property
    def name(self) -> str:
        """``Q4_K_M``, ``Q4_K_M-imat``, ``Q4_K_M-tuned``, ``Q4_K_M-imat-tuned``, ``T4.85``
        or ``T4.85-imat``."""
        matrix = IMATRIX_SUFFIX if self.imatrix else ""
        if self.bpw is not None:
            return f"{BUDGET_PREFIX}{self.bpw:.2f}{matrix}"
        return self.quant.name + matrix + (TUNED_SUFFIX if self.tuned else "")

    @property
    def nominal_bpw(self) -> float:
        """The bits per weight the variant is named for: its budget, or its type's."""
        return self.bpw if self.bpw is not None else self.quant.bpw


def parse_variant(name: str) -> Variant:
    """``Q4_K_M-imat`` -> Variant(Q4_K_M, imatrix=True), ``Q4_K_M-tuned`` -> Variant(Q4_K_M,
    tuned=True), ``T4.85`` -> the tuned variant of a 4.85-bit budget; plain names as
    :func:`get_quant`.

    The one place that reads a variant name, so that a suffix means the same thing in every
    command and in the report.
    """
    key = name.strip()
    budget_key = key[: -len(IMATRIX_SUFFIX)] if key.lower().endswith(IMATRIX_SUFFIX) else key
    if m := _BUDGET_NAME.match(budget_key):
        bpw = round(float(m.group(1)), 2)  # the name's precision: T15.999 is T16.00
        if not 1 <= bpw < 16:
            raise UnknownQuantError(f"{key!r}: a budget of {bpw:g} bits per weight is not "
                                    "between 1 and 16 (BF16)", "e.g. T4.85")
        return Variant.budget(bpw, imatrix=budget_key != key)
    tuned = key.lower().endswith(TUNED_SUFFIX)
    key = key[: -len(TUNED_SUFFIX)] if tuned else key
    bare = key[: -len(IMATRIX_SUFFIX)] if key.lower().endswith(IMATRIX_SUFFIX) else key
    if tuned and _BUDGET_NAME.match(bare):
        raise UnknownQuantError(f"{name.strip()!r}: a {BUDGET_PREFIX}<bpw> budget is tuned "
                                "by definition", f"use {key}")
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
        budget = f"--bpw {v.bpw:g}" if v.bpw is not None else f"--match {v.quant.name}"
        return f"mathq tune {recipe} {budget}{matrix}"
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


def parse_tune_list(text: str) -> tuple[Variant, ...]:
    """``Q4_K_M,T4.85`` -> the tuned variants to make: a type's (its stock file's size) or a
    bits-per-weight budget's, in order, repeats dropped (``--tune``, ``[tune] budgets``)."""
    seen: dict[str, Variant] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        v = parse_variant(part)
        if v.imatrix:
            raise UnknownQuantError(f"{part.strip()!r}: name the type or budget alone",
                                    "--imatrix adds the -imat sibling of each")
        if v.quant.is_float:
            raise UnknownQuantError(f"{part.strip()!r}: {v.quant.name} is not quantized, so it "
                                    "has no tuned sibling", "e.g. Q4_K_M,Q3_K_M or T4.85")
        v = v if v.tuned else Variant(v.quant, tuned=True)
        seen.setdefault(v.name, v)
    if not seen:
        raise UnknownQuantError("no type or budget to tune given", "e.g. Q4_K_M or T4.85")
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


# --- ggml tensor types ------------------------------------------------------------------
# A file type above is a mix: llama.cpp stores each tensor in one ggml tensor type (Q4_K,
# Q6_K, Q8_0 ...). The facts about those, in one place.

FILE_TYPE_OF_TENSOR_TYPE = {
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
    "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_S", "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M"}
"""The file type a file mostly of one tensor type is named after (a tuned file's
``general.file_type``): the stock mix built on that tensor type. Its keys are the tensor
types a quantized file can choose among."""

def tunable_type(name: object) -> str | None:
    """``q4_k`` -> ``Q4_K``: a tensor type the tuner can choose, in gguf's spelling; None
    for anything else (the one check behind ``tune --types`` and a recipe's ``[tune]
    types``)."""
    key = name.strip().upper() if isinstance(name, str) else None
    return key if key in FILE_TYPE_OF_TENSOR_TYPE else None


#: The fix for a type the tuner cannot choose: the types it can, not ggml's whole list.
TUNABLE_TYPES_HINT = f"choose from {', '.join(FILE_TYPE_OF_TENSOR_TYPE)}"

TENSOR_TYPE_FALLBACK = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL"}
"""llama.cpp's own fallback when a tensor's rows are not whole blocks of a type
(``tensor_type_fallback`` in src/llama-quant.cpp): what it really stores instead."""


def tensor_type_block(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml tensor type, from gguf's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[name.strip().upper()]]


def tensor_type_bpw(name: str) -> float:
    """Bits per weight of a ggml tensor type (Q4_K: 4.5, Q8_0: 8.5)."""
    block, size = tensor_type_block(name)
    return size * 8 / block
