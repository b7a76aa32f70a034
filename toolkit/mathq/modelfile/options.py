"""Which ``PARAMETER`` names Ollama's ``create`` accepts, and which values it can parse.

Ollama turns each Modelfile ``PARAMETER name value`` into a typed option by looking the
name up among the JSON names of its ``api.Options`` and ``api.Runner`` structs and parsing
the text with Go's ``strconv`` (``ParseInt`` base 10, ``ParseFloat`` to 32 bits,
``ParseBool``); an unknown name or an unparsable value fails the whole ``create``. A few
retired names are skipped with a warning instead. This table mirrors Ollama's
``api/types.go`` and ``parser/parser.go`` (2025); recipes and the Modelfile validator both
check against it, so it is the one place to update when Ollama changes.
"""

from __future__ import annotations

import difflib
import math
import re
import struct
from dataclasses import dataclass

from mathq.errors import shorten

OPTION_KINDS = ("int", "float", "bool", "string_list")


@dataclass(frozen=True)
class OllamaOption:
    """One option Ollama accepts in a Modelfile, with the Go type it is parsed into."""

    name: str
    kind: str
    description: str


OLLAMA_OPTIONS: tuple[OllamaOption, ...] = (
    # api.Runner: fixed when the model is loaded
    OllamaOption("num_ctx", "int", "context window in tokens"),
    OllamaOption("num_batch", "int", "prompt-processing batch size"),
    OllamaOption("num_gpu", "int", "layers offloaded to the GPU"),
    OllamaOption("main_gpu", "int", "GPU that holds small tensors"),
    OllamaOption("use_mmap", "bool", "memory-map the model file"),
    OllamaOption("num_thread", "int", "CPU threads"),
    # api.Options: sampling, per request
    OllamaOption("num_keep", "int", "tokens kept when the context shifts"),
    OllamaOption("seed", "int", "random seed"),
    OllamaOption("num_predict", "int", "most tokens to generate (-1: no limit)"),
    OllamaOption("top_k", "int", "sample from the k most likely tokens"),
    OllamaOption("top_p", "float", "nucleus sampling threshold"),
    OllamaOption("min_p", "float", "minimum probability relative to the top token"),
    OllamaOption("typical_p", "float", "locally typical sampling"),
    OllamaOption("repeat_last_n", "int", "tokens looked back for repeat penalties"),
    OllamaOption("temperature", "float", "sampling temperature (0: greedy)"),
    OllamaOption("repeat_penalty", "float", "penalty for repeated tokens (1: none)"),
    OllamaOption("presence_penalty", "float", "penalty for tokens already present"),
    OllamaOption("frequency_penalty", "float", "penalty by token frequency"),
    OllamaOption("stop", "string_list", "stop strings; one PARAMETER line each"),
)

DEPRECATED_OPTIONS: tuple[str, ...] = (
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
    "mirostat", "mirostat_tau", "mirostat_eta",
)
"""Names Ollama's parser still reads but ignores (with a warning): they do nothing."""

_BY_NAME = {o.name: o for o in OLLAMA_OPTIONS}

_DEC = r"[0-9](?:_?[0-9])*"
_HEX = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_GO_FLOAT = re.compile(  # decimal, hexadecimal (with a p exponent), infinity; NaN unsigned
    rf"[+-]?(?:(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?"
    rf"|0[xX]_?(?:{_HEX}(?:\.(?:{_HEX})?)?|\.{_HEX})[pP][+-]?{_DEC}"
    r"|(?i:inf|infinity))|(?i:nan)")
_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False,
             "False": False}
_INT64 = (-(2**63), 2**63 - 1)


def get_option(name: str) -> OllamaOption | None:
    """The option called ``name``, or None when Ollama does not know it."""
    return _BY_NAME.get(name)


def parse_go_float32(text: str) -> float | None:
    """``text`` parsed as Go's ``strconv.ParseFloat(text, 32)`` would, or None if it fails."""
    if not _GO_FLOAT.fullmatch(text):
        return None
    plain = text.replace("_", "")
    lower = plain.lower().lstrip("+-")
    if lower in ("inf", "infinity", "nan"):
        return float(plain.lower().replace("infinity", "inf"))
    try:
        value = float.fromhex(plain) if "x" in lower else float(plain)
    except OverflowError:  # a hexadecimal float beyond any double: Go's ErrRange too
        return None
    try:  # round to float32 as Go does; a finite number that rounds to Inf is ErrRange
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # older Pythons refuse instead of rounding to Inf
        return None
    return None if math.isinf(rounded) else rounded


def parse_go_int64(text: str) -> int | None:
    """``text`` parsed as Go's ``strconv.ParseInt(text, 10, 64)``, or None if it fails."""
    if not _GO_INT.fullmatch(text):
        return None
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 19:  # beyond int64, and beyond Python's int() of a long string
        return None
    value = int(digits) * (-1 if text.startswith("-") else 1)
    return value if _INT64[0] <= value <= _INT64[1] else None


def parse_go_bool(text: str) -> bool | None:
    """``text`` parsed as Go's ``strconv.ParseBool``, or None if it fails."""
    return _GO_BOOLS.get(text)


def parameter_problem(name: str, text: str) -> str | None:
    """Why ``PARAMETER name text`` would not work in Ollama, or None when it would."""
    if name in DEPRECATED_OPTIONS:
        return f"parameter '{name}' is deprecated: Ollama ignores it"
    option = get_option(name)
    if option is None:
        if not name:
            return "PARAMETER has no name"
        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown parameter '{name}'{hint}"
    if option.kind == "int" and parse_go_int64(text) is None:
        return f"{name} takes a whole number, got {shorten(text)!r}"
    if option.kind == "float":
        value = parse_go_float32(text)
        if value is None:
            return f"{name} takes a number, got {shorten(text)!r}"
        if math.isnan(value) or math.isinf(value):
            return f"{name} must be finite, got {shorten(text)!r}"
    if option.kind == "bool" and parse_go_bool(text) is None:
        return f"{name} takes true or false, got {shorten(text)!r}"
    return None


def format_parameter_values(name: str, value: object) -> list[str]:
    """The Modelfile text for a recipe value: one string per ``PARAMETER`` line.

    TOML gives bools, ints, floats, strings and lists of strings; a list becomes several
    lines, which Ollama only accepts for list options such as ``stop``.
    """
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


def recipe_parameter_problem(name: str, value: object) -> str | None:
    """Why a recipe's ``[ollama.parameters]`` entry cannot become Modelfile lines, or None."""
    texts = format_parameter_values(name, value)
    option = get_option(name)
    if isinstance(value, list) and option is not None and option.kind != "string_list":
        return f"{name} takes one value, not a list"
    if option is not None and option.kind == "string_list" and not isinstance(value, (list, str)):
        return f"{name} takes a string or a list of strings"
    for text in texts:
        if problem := parameter_problem(name, text):
            return problem
    return None
