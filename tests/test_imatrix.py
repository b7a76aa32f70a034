"""mathq imatrix: llama.cpp's activations read through the eval callback, checked against
NumPy, against a matrix llama-imatrix wrote, and used by the quantizer for IQ types."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from mathq.cli import cli
from mathq.convert.gguf_info import read_gguf_summary
from mathq.errors import ImatrixComputeError
from mathq.llama.ggml_view import GgmlTensor, f32_view, ggml_api, tensor_name
from mathq.llama.runtime import capture_llama_log
from mathq.quantize.core import QuantizeOptions, quantize_gguf
from mathq.quantize.imatrix import (
    ActivationCollector,
    ImatrixOptions,
    compute_imatrix,
    tokenize,
    weight_name,
)
from mathq.quantize.imatrix_file import load_imatrix
from mathq.recipes.quants import get_quant
from tests.conftest import FIXTURES

REFERENCE = FIXTURES / "imatrix"
TEXT = (REFERENCE / "calibration.txt").read_text(encoding="utf-8")
PROVENANCE = json.loads((REFERENCE / "provenance.json").read_text(encoding="utf-8"))


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def matrix(tiny_bf16_gguf: Path, tmp_path_factory) -> Path:
    """mathq's matrix of the tiny model on the reference text, with llama-imatrix's settings."""
    dest = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    compute_imatrix(tiny_bf16_gguf, TEXT, dest,
                    ImatrixOptions(n_ctx=PROVENANCE["ctx"], chunks=PROVENANCE["chunks"]),
                    dataset="calibration.txt")
    return dest


def _tokens(model: Path, text: str) -> list[int]:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with capture_llama_log(lambda _level, _line: None):
        handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    try:
        return tokenize(handle, text, parse_special=True)
    finally:
        llama_cpp.llama_model_free(handle)


def _bf16_rows(reader: GGUFReader, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows of a BF16 matrix as float32 (exact), read straight from the file's bytes."""
    t = next(t for t in reader.tensors if t.name == name)
    words = np.asarray(t.data).view(np.uint16).reshape(int(t.shape[1]), int(t.shape[0]))
    return (words[rows].astype(np.uint32) << 16).view(np.float32)


# --- the ctypes view of ggml ------------------------------------------------------------

def test_struct_layout_reads_the_models_own_weights(demo_bf16_gguf):
    """Every weight the callback sees has the name, type and shape the GGUF file lists."""
    api = ggml_api()  # checks sizeof(struct ggml_tensor) against the library
    seen: dict[str, tuple[int, int, int]] = {}

    class Recorder(ActivationCollector):
        def wants(self, t: GgmlTensor) -> bool:
            if t.op == api.op_mul_mat:
                w = t.src[0].contents
                seen[weight_name(tensor_name(w))] = (w.type, w.ne[0], w.ne[1])
                x = f32_view(t.src[1].contents)  # the input's view spans ne[0] columns
                assert x.shape[-1] == w.ne[0]
            return super().wants(t)

    rec = Recorder(api)
    from mathq.quantize.imatrix import _decode_chunk, _Llama

    with _Llama(demo_bf16_gguf, ImatrixOptions(n_ctx=32), rec) as llm:
        llm.open_context()
        batch = llama_cpp.llama_batch_init(32, 0, 1)
        try:
            _decode_chunk(llm, batch, _tokens(demo_bf16_gguf, TEXT)[:32])
        finally:
            llama_cpp.llama_batch_free(batch)
    summary = read_gguf_summary(demo_bf16_gguf)
    weights = {t.name: t for t in summary.tensors if len(t.shape) == 2}
    bf16 = 30  # enum ggml_type GGML_TYPE_BF16
    assert len(seen) == 4 * 7 + 1  # four blocks of seven, and the output head
    assert set(seen) == set(weights) - {"token_embd.weight"}  # embeddings are GET_ROWS
    for name, (type_, ne0, ne1) in seen.items():
        assert (type_, ne0, ne1) == (bf16, *weights[name].shape), name


# --- what is collected ------------------------------------------------------------------

def test_first_layer_inputs_match_numpy(tiny_bf16_gguf, matrix):
    """blk.0.attn_q's input is the RMS-normalised embedding of each token (norm weights
    are 1): recompute it in NumPy from the file's own embedding rows and the chunking
    rules (chunks of n_ctx, first token of each replaced by BOS)."""
    ctx, chunks = PROVENANCE["ctx"], PROVENANCE["chunks"]
    tokens = np.array(_tokens(tiny_bf16_gguf, TEXT)[:ctx * chunks]).reshape(chunks, ctx)
    tokens[:, 0] = 100000
    x = _bf16_rows(GGUFReader(tiny_bf16_gguf), "token_embd.weight",
                   tokens.reshape(-1)).astype(np.float64)
    x /= np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
    expected = (x * x).sum(axis=0)
    got = GGUFReader(matrix)
    sums = {t.name: np.asarray(t.data).reshape(-1) for t in got.tensors}
    np.testing.assert_allclose(sums["blk.0.attn_q.weight.in_sum2"], expected, rtol=1e-4)
    assert sums["blk.0.attn_q.weight.counts"].tolist() == [ctx * chunks]
    # q, k and v read the same input; so do gate and up
    for layer in (0, 1):
        q = sums[f"blk.{layer}.attn_q.weight.in_sum2"]
        for other in ("attn_k", "attn_v"):
            assert np.array_equal(q, sums[f"blk.{layer}.{other}.weight.in_sum2"])
        assert np.array_equal(sums[f"blk.{layer}.ffn_gate.weight.in_sum2"],
                              sums[f"blk.{layer}.ffn_up.weight.in_sum2"])


def test_inputs_in_device_memory_are_copied_out(tiny_bf16_gguf, matrix, tmp_path,
                                                monkeypatch):
    """With layers on a GPU, a multiplication's input lives in device memory and is copied
    to the host with ggml_backend_tensor_get (llama-imatrix's way). CPU buffers answer the
    same call, so forcing that path here must give the very same matrix, byte for byte."""
    from mathq.llama.ggml_view import GgmlApi

    api = ggml_api()
    copied: list[int] = []
    real_get = api.lib.ggml_backend_tensor_get

    def tensor_get(tensor, data, offset, size):
        copied.append(size)
        return real_get(tensor, data, offset, size)

    monkeypatch.setattr(GgmlApi, "is_host", lambda self, t: False)
    monkeypatch.setattr(api.lib, "ggml_backend_tensor_get", tensor_get)
    dest = tmp_path / "copied.imatrix.gguf"
    compute_imatrix(tiny_bf16_gguf, TEXT, dest,
                    ImatrixOptions(n_ctx=PROVENANCE["ctx"], chunks=PROVENANCE["chunks"]),
                    dataset="calibration.txt")
    assert len(copied) >= 2 * 7 * PROVENANCE["chunks"]  # every hooked input of every chunk
    ours, theirs = GGUFReader(dest), GGUFReader(matrix)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), a.name


def test_agrees_with_llama_imatrix_within_one_percent(tiny_bf16_gguf, matrix):
    """The committed file was written by llama-imatrix itself on this model and text (see
    tests/fixtures/imatrix/README.md); every tensor's mean squared activations agree."""
    fingerprint = _fingerprint(tiny_bf16_gguf)
    assert fingerprint == PROVENANCE["model_fingerprint"], (
        "tiny_bf16_gguf changed since the reference was made; regenerate it with "
        "`python benchmarks/imatrix.py --write-reference`")
    ref = load_imatrix(REFERENCE / "llama-imatrix.gguf")
    ours = load_imatrix(matrix)
    assert sorted(ours.entries) == sorted(ref.entries)
    assert ours.chunk_count == ref.chunk_count == PROVENANCE["chunks"]
    for name, want in ref.entries.items():
        rel = np.abs(ours.entries[name] - want) / np.maximum(np.abs(want), 1e-12)
        assert rel.max() < 0.01, (name, float(rel.max()))
        assert abs(ours.entries[name].sum() / want.sum() - 1) < 1e-3, name


def _fingerprint(model: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in GGUFReader(model).tensors:
        h.update(t.name.encode())
        h.update(np.asarray(t.data).tobytes())
    return h.hexdigest()


def test_output_weight_only_when_asked(demo_matrix, demo_bf16_gguf, tmp_path):
    assert "output.weight" not in load_imatrix(demo_matrix).entries  # llama-imatrix's default
    dest = tmp_path / "with-output.imatrix.gguf"
    compute_imatrix(demo_bf16_gguf, TEXT, dest,
                    ImatrixOptions(n_ctx=64, chunks=1, process_output=True), "x")
    entries = load_imatrix(dest).entries
    assert "output.weight" in entries and len(entries) == 4 * 7 + 1
    assert "token_embd.weight" not in entries


# --- the matrix in use ------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_matrix(demo_bf16_gguf: Path, tmp_path_factory) -> Path:
    """mathq's matrix of the bundled (trained) demo model."""
    dest = tmp_path_factory.mktemp("demo-imatrix") / "tiny-demo.imatrix.gguf"
    compute_imatrix(demo_bf16_gguf, TEXT, dest, ImatrixOptions(n_ctx=128, chunks=8),
                    dataset="calibration.txt")
    return dest


@pytest.mark.parametrize("quant", ["IQ2_XXS", "IQ3_XXS"])
def test_iq_types_that_need_a_matrix_build_and_generate(demo_bf16_gguf, demo_matrix,
                                                         tmp_path, quant):
    q = get_quant(quant)
    assert q.requires_imatrix
    r = quantize_gguf(demo_bf16_gguf, tmp_path / f"tiny-demo-{quant}.gguf",
                      QuantizeOptions(q, imatrix=demo_matrix))
    assert r.tensor_types["blk.3.ffn_gate.weight"] == quant
    meta = GGUFReader(r.path).fields
    assert meta["quantize.imatrix.dataset"].contents() == "calibration.txt"
    assert meta["quantize.imatrix.chunks_count"].contents() == 8
    llm = llama_cpp.Llama(str(r.path), n_ctx=128, n_threads=2, verbose=False)
    prompt = "User: Ann has 3 apples and gets 4 more. How many apples does Ann have now?\n\n"
    out = llm.create_completion(prompt + "Assistant:", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_too_little_text_is_one_clear_error(demo_bf16_gguf, tmp_path):
    with pytest.raises(ImatrixComputeError, match="fewer than one chunk of 512"):
        compute_imatrix(demo_bf16_gguf, "Compute $1+1$.", tmp_path / "x.gguf",
                        ImatrixOptions(), "x")
    assert not (tmp_path / "x.gguf").exists()
