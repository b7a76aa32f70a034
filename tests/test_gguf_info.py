"""mathq's one GGUF header reader against gguf-py's stock ``GGUFReader``.

Every kind of GGUF the tests make goes through both readers: the converter's BF16 files
(DeepSeek's real vocabulary), llama.cpp's vocab-only fixture, llama.cpp's quantized files,
an importance matrix, and small hand-written files with other alignments and value types.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

from mathq.convert.gguf_info import read_gguf_header, tensor_data
from mathq.errors import GGUFError

FIXTURES = Path(__file__).parent / "fixtures"


def assert_same_as_stock(path: Path) -> None:
    """Scalars, strings, tensor table, data offsets and bytes equal what GGUFReader reads."""
    ours, stock = read_gguf_header(path), GGUFReader(path)
    scalars = {
        name: field.contents() for name, field in stock.fields.items()
        if not name.startswith("GGUF.") and field.types
        and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert ours.values == pytest.approx(scalars)
    assert ours.data_offset == stock.data_offset
    assert len(ours.summary.tensors) == len(stock.tensors)
    for mine, theirs in zip(ours.summary.tensors, stock.tensors, strict=True):
        assert (mine.name, mine.type, mine.shape, mine.offset, mine.n_bytes) == (
            theirs.name, theirs.tensor_type.name, tuple(int(d) for d in theirs.shape),
            int(theirs.data_offset), int(theirs.n_bytes))
        assert tensor_data(path, mine).tobytes() == np.asarray(theirs.data).tobytes()


def test_converted_bf16_with_deepseek_vocabulary(tiny_bf16_gguf):
    assert_same_as_stock(tiny_bf16_gguf)


def test_llama_cpp_vocab_only_fixture():
    assert_same_as_stock(FIXTURES / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf")


@pytest.mark.parametrize("quant", ["BF16", "Q8_0", "Q4_K_M"])
def test_llama_cpp_quantized_files(tiny_quant_ggufs, quant):
    assert_same_as_stock(tiny_quant_ggufs[quant])


def test_committed_imatrix_file():
    matrices = sorted((FIXTURES / "imatrix").glob("*.gguf"))
    assert matrices, "the llama-imatrix fixture is missing"
    for path in matrices:
        assert_same_as_stock(path)


@pytest.mark.parametrize("alignment", [32, 64, 256])
def test_hand_written_file_of_every_value_type(tmp_path, alignment):
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(alignment)
    w.add_token_list(["a", "ü", "[PAD2]"])
    w.add_token_types([1, 4, 5])
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -3)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_int64("t.i64", -(1 << 40))
    w.add_string("t.str", "χ² ≤ 1")
    w.add_array("t.floats", [1.5, 2.5])
    w.add_tensor("t.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("t.half", np.ones((4, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_stock(path)


def test_truncated_file_is_one_clean_error(tiny_bf16_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_bf16_gguf.read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match=r"damaged GGUF file.*past the end"):
        read_gguf_header(cut)
