"""Fuzzing the two header parsers that read untrusted files: nothing but their clean error.

The safetensors header parser (:func:`mathq.convert.safetensors_reader.read_header`) and the
GGUF header scanner (:func:`mathq.convert.gguf_info.read_gguf_header`) read files that may be
cut short, damaged or hostile. Whatever the bytes, each either returns or raises its own
one-line error (``CheckpointError``, ``GGUFError``): never ``struct.error``, ``KeyError``,
``RecursionError``, a NumPy error or a hang. Hypothesis generates the files from three
kinds of input each: random bytes, valid files cut or corrupted at random places, and
well-formed containers with random field values. Examples are bounded and derandomised,
so the test is fast and the same in every run.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mathq.convert.gguf_info import read_gguf_header
from mathq.convert.safetensors_reader import DTYPES, read_header
from mathq.errors import CheckpointError, GGUFError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _write(data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mathq-fuzz-"))
    path = folder / "f"
    path.write_bytes(data)
    return path


def _parse_safetensors(data: bytes) -> None:
    path = _write(data)
    try:
        read_header(path)
    except CheckpointError as e:
        assert str(e) and "\n" not in e.message
    finally:
        path.unlink()
        path.parent.rmdir()


def _safetensors(header: object, data_len: int, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + b"\0" * data_len


VALID = _safetensors({"__metadata__": {"format": "pt"},
                      "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}}, 28)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)
tensor_specs = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "Q4", "", "bf16"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3) | json_values,
})


@FUZZ
@given(st.binary(max_size=200))
def test_safetensors_random_bytes(data: bytes):
    _parse_safetensors(data)


@FUZZ
@given(st.integers(0, len(VALID)), st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                                     st.integers(0, 255)), max_size=6))
def test_safetensors_cut_and_corrupted(cut: int, flips: list[tuple[int, int]]):
    data = bytearray(VALID)
    for at, value in flips:
        data[at] = value
    _parse_safetensors(bytes(data[:cut]))


@FUZZ
@given(st.dictionaries(st.text(max_size=10), tensor_specs | json_values, max_size=5),
       st.integers(0, 64))
def test_safetensors_wellformed_json_with_random_fields(header: dict, data_len: int):
    _parse_safetensors(_safetensors(header, data_len))


@FUZZ
@given(st.integers(1, 5000), st.sampled_from(["[", "{\"a\":", "\"", "{"]))
def test_safetensors_deeply_nested_or_unterminated_json(depth: int, opener: str):
    _parse_safetensors(_safetensors(None, 0, (opener * depth).encode()))


def _valid_gguf() -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="mathq-fuzz-"))
    path = folder / "v.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("x.u32", 7)
    w.add_string("x.s", "text")
    w.add_array("x.arr", [1, 2, 3])
    w.add_array("x.strs", ["a", "bc"])
    w.add_tensor("t0", np.arange(8, dtype=np.float32))
    w.add_tensor("t1", np.ones((2, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.unlink()
    folder.rmdir()
    return data


VALID_GGUF = _valid_gguf()


def _parse_gguf(data: bytes) -> None:
    path = _write(data)
    try:
        read_gguf_header(path)
    except GGUFError as e:
        assert str(e) and "\n" not in e.message
    finally:
        path.unlink()
        path.parent.rmdir()


def test_the_seed_file_is_valid():
    _parse_gguf(VALID_GGUF)
    path = _write(VALID_GGUF)
    try:
        assert len(read_gguf_header(path).summary.tensors) == 2
    finally:
        path.unlink()
        path.parent.rmdir()


@FUZZ
@given(st.binary(max_size=300))
def test_gguf_random_bytes_after_the_magic(data: bytes):
    _parse_gguf(b"GGUF" + data)


@FUZZ
@given(st.integers(0, len(VALID_GGUF)),
       st.lists(st.tuples(st.integers(4, len(VALID_GGUF) - 1), st.integers(0, 255)),
                max_size=6))
def test_gguf_cut_and_corrupted(cut: int, flips: list[tuple[int, int]]):
    data = bytearray(VALID_GGUF)
    for at, value in flips:
        data[at] = value
    _parse_gguf(bytes(data[:cut]))


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_gguf_header_with_random_counts_and_lengths(n_tensors: int, n_kv: int, kind: int,
                                                    length: int, rest: bytes):
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + struct.pack("<Q", 3) + b"key" \
        + struct.pack("<IQ", kind, length) + rest
    _parse_gguf(data)
