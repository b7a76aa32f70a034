"""Quantize: real llama.cpp quantization of the converted demo model, tensor by tensor."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from mathq.convert.gguf_info import read_gguf_summary
from mathq.errors import MathqError, QuantizeError
from mathq.llama.runtime import capture_llama_log
from mathq.manifest import Manifest
from mathq.quantize.core import QuantizeOptions, quantize_gguf
from mathq.quantize.imatrix_file import ImatrixError, load_imatrix, write_imatrix_gguf
from mathq.recipes.quants import QUANT_TYPES, get_quant
from tests.clirun import run

# Requested type -> (main matrices, output.weight, attn_v of the last layer) as llama.cpp's
# mixes define them for the demo model (4 layers, widths multiples of 256).
EXPECTED = {
    "Q2_K": ("Q2_K", "Q6_K", "Q3_K"),
    "Q3_K_M": ("Q3_K", "Q6_K", "Q4_K"),  # Q5_K only in the first two layers
    "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"),
    "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"),
    "Q6_K": ("Q6_K", "Q6_K", "Q6_K"),
    "Q8_0": ("Q8_0", "Q8_0", "Q8_0"),
    "IQ4_XS": ("IQ4_XS", "Q6_K", "IQ4_XS"),
}


@pytest.fixture(scope="module")
def variants(demo_bf16_gguf: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    return {q: quantize_gguf(demo_bf16_gguf, out / f"tiny-{q}.gguf",
                             QuantizeOptions(get_quant(q))).path for q in EXPECTED}


@pytest.mark.parametrize("quant", list(EXPECTED))
def test_tensor_types_follow_llama_cpp_mixes(variants, quant):
    summary = read_gguf_summary(variants[quant])
    types = summary.tensor_types()
    main, output, last_v = EXPECTED[quant]
    assert summary.file_type == get_quant(quant).ftype
    assert types["output.weight"] == output
    assert types["blk.0.attn_q.weight"] == main
    assert types["blk.1.ffn_up.weight"] == main
    last = max(int(name.split(".")[1]) for name in types if name.startswith("blk."))
    assert types[f"blk.{last}.attn_v.weight"] == last_v
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32


@pytest.mark.parametrize("quant", list(EXPECTED))
def test_each_variant_loads_and_generates(variants, quant):
    llm = llama_cpp.Llama(str(variants[quant]), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion("User: Tom has 3 apples.", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def _tensor_bytes(path: Path, name: str) -> bytes:
    from gguf import GGUFReader

    return next(bytes(t.data) for t in GGUFReader(path).tensors if t.name == name)


def _weights(model: Path) -> dict[str, int]:
    """Every 2-D weight llama.cpp may look up in an imatrix, with its input width."""
    return {t.name: t.shape[0] for t in read_gguf_summary(model).tensors
            if len(t.shape) == 2 and t.name != "token_embd.weight"}


def _write_legacy(path: Path, values: dict[str, np.ndarray], ncall: int) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            f.write(struct.pack("<i", len(name)) + name.encode())
            f.write(struct.pack("<ii", ncall, v.size) + (v * ncall).astype(np.float32).tobytes())
        f.write(struct.pack("<ii", 7, 4) + b"math")


def test_imatrix_changes_output_and_both_formats_agree(demo_bf16_gguf, variants, tmp_path):
    rng = np.random.default_rng(1)
    values = {n: rng.gamma(0.5, 2.0, width).astype(np.float32)
              for n, width in _weights(demo_bf16_gguf).items()}
    as_gguf, as_dat = tmp_path / "m.imatrix.gguf", tmp_path / "m.imatrix.dat"
    write_imatrix_gguf(as_gguf, {n: v * 96 for n, v in values.items()},
                       {n: np.array([96.0]) for n in values}, ("math.txt",), 3, 32)
    _write_legacy(as_dat, values, ncall=6)
    for f in (as_gguf, as_dat):
        np.testing.assert_allclose(load_imatrix(f).entries["blk.0.attn_q.weight"],
                                   values["blk.0.attn_q.weight"], rtol=1e-6)
    q = get_quant("Q4_K_M")
    a = quantize_gguf(demo_bf16_gguf, tmp_path / "a.gguf", QuantizeOptions(q, imatrix=as_gguf))
    b = quantize_gguf(demo_bf16_gguf, tmp_path / "b.gguf", QuantizeOptions(q, imatrix=as_dat))
    name = "blk.0.attn_q.weight"
    assert _tensor_bytes(a.path, name) != _tensor_bytes(variants["Q4_K_M"], name)
    assert _tensor_bytes(a.path, name) == _tensor_bytes(b.path, name)
    fields = read_gguf_summary  # metadata records the matrix, as llama-quantize does
    from gguf import GGUFReader

    meta = GGUFReader(a.path).fields
    assert meta["quantize.imatrix.entries_count"].contents() == len(values)
    assert meta["quantize.imatrix.dataset"].contents() == "math.txt"
    assert fields(a.path).file_type == q.ftype


def test_imatrix_unlocks_types_that_require_one(demo_bf16_gguf, tmp_path):
    widths = _weights(demo_bf16_gguf)
    path = tmp_path / "m.imatrix.gguf"
    write_imatrix_gguf(path, {n: np.ones(w, np.float32) for n, w in widths.items()},
                       {n: np.array([1.0]) for n in widths}, ("x",), 1, 32)
    with pytest.raises(QuantizeError, match="IQ2_XXS needs an importance matrix"):
        quantize_gguf(demo_bf16_gguf, tmp_path / "x.gguf", QuantizeOptions(get_quant("IQ2_XXS")))
    r = quantize_gguf(demo_bf16_gguf, tmp_path / "x.gguf",
                      QuantizeOptions(get_quant("IQ2_XXS"), imatrix=path))
    assert r.tensor_types["blk.0.attn_q.weight"] == "IQ2_XXS"


def _legacy_bytes(entries: list[tuple[str, int, list[float]]]) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals))
        out += np.asarray(vals, np.float32).tobytes()
    return out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x02\x00", "file ends early"),
        (_legacy_bytes([("blk.0.attn_q.weight", 1, [1.0] * 256)])[:-8], "file ends early"),
        (struct.pack("<i", 0), "0 entries"),
        (_legacy_bytes([("blk.0.attn_q.weight", 1, [float("nan")] * 256)]), "NaN"),
        (_legacy_bytes([("nothing.weight", 1, [1.0] * 256)]), "no entry for any tensor"),
        (_legacy_bytes([("blk.0.attn_q.weight", 1, [1.0] * 100)]), "has 100 values"),
    ],
)
def test_malformed_imatrix_is_refused_and_writes_nothing(demo_bf16_gguf, tmp_path, content,
                                                         problem):
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(content)
    out = tmp_path / "never.gguf"
    with pytest.raises((ImatrixError, QuantizeError), match=problem):
        quantize_gguf(demo_bf16_gguf, out, QuantizeOptions(get_quant("Q4_K_M"), imatrix=bad))
    assert list(tmp_path.glob("never*")) == []


def test_requires_imatrix_column_matches_llama_cpp(demo_bf16_gguf, tmp_path):
    """A dry run without a matrix tells which types llama.cpp would refuse."""
    for q in QUANT_TYPES:
        if q.is_float:
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.dry_run, params.nthread = q.ftype, True, 1
        lines: list[str] = []
        with capture_llama_log(lambda _lvl, line, out=lines: out.append(line)):
            llama_cpp.llama_model_quantize(str(demo_bf16_gguf).encode(),
                                           str(tmp_path / "dry.gguf").encode(),
                                           ctypes.byref(params))
        needs = any("will require an imatrix" in line for line in lines)
        assert needs == q.requires_imatrix, q.name


def test_cli_quantizes_a_recipes_build_folder(demo_bf16_gguf, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        '[model]\nname = "tiny"\nlocal_dir = "."\nkind = "chat"\nlicense_name = "MIT"\n'
        'license_url = "https://example.org"\n[prompt]\ntemplate = "deepseek-chat"\n'
        '[quants]\nvariants = ["Q8_0", "Q4_K_M"]\n[ollama]\nmodel = "tiny"\n'
        '[ollama.tags]\nlatest = "Q4_K_M"\n[smoke]\n')
    root = tmp_path / "build"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "tiny-BF16.gguf").symlink_to(demo_bf16_gguf)
    out = run("quantize", str(recipe), "--build-dir", str(root)).output
    assert "Q8_0" in out and "Q4_K_M" in out
    assert (root / "tiny" / "tiny-Q8_0.gguf").is_file()
    rec = Manifest(root / "tiny" / "manifest.json").get("tiny-Q4_K_M.gguf")
    assert rec is not None and rec.stage == "quantize" and rec.settings["quant"] == "Q4_K_M"


def test_cli_errors_are_one_line_and_leave_no_file(variants, tmp_path):
    q4 = str(variants["Q4_K_M"])
    result = run("quantize", q4, "-Q", "Q8_0", "--out-dir", str(tmp_path), code=1)
    assert result.output.splitlines() == [
        "Error: tiny-Q4_K_M.gguf is already quantized (Q4_K_M); requantizing loses more "
        "quality than quantizing the BF16 file (quantize the BF16 GGUF instead, or pass "
        "--allow-requantize)"]
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    result = run("quantize", str(not_gguf), "--out-dir", str(tmp_path), code=1)
    assert "is not a GGUF file" in result.output
    result = run("quantize", q4, "-Q", "Q4KM", code=2)
    assert result.output.strip() == (
        "Error: unknown quantization type 'Q4KM' (did you mean Q4_K_M or Q5_K_M or Q4_K_S?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"]


def _bump_u32(src: Path, dest: Path, key: str) -> Path:
    """``src`` with the u32 metadata value ``key`` one larger: a header llama.cpp refuses."""
    data = bytearray(src.read_bytes())
    at = data.index(key.encode()) + len(key)
    kind, value = struct.unpack_from("<II", data, at)
    assert kind == 4  # GGUF_TYPE_UINT32
    struct.pack_into("<I", data, at + 4, value + 1)
    dest.write_bytes(data)
    return dest


@pytest.mark.parametrize("breakage", ["llama.block_count", "llama.embedding_length",
                                      "truncated"])
def test_verification_refuses_what_llama_cpp_refuses(variants, tmp_path, breakage):
    """Verifying without reading the weights still checks what a load checks: every tensor
    the hyper-parameters call for (a missing block), their shapes, the file's bounds."""
    from mathq.quantize.core import verify_quantized

    good = variants["Q8_0"]
    n = len(read_gguf_summary(good).tensors)
    bad = tmp_path / "bad.gguf"
    if breakage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        _bump_u32(good, bad, breakage)
    with pytest.raises(MathqError):  # the header check or llama.cpp's load refuses it
        verify_quantized(bad, get_quant("Q8_0"), n)
    assert verify_quantized(good, get_quant("Q8_0"), n).file_type == get_quant("Q8_0").ftype


def test_verification_reads_no_weights(tiny_bf16_gguf, tmp_path):
    """At 7B a full load to verify held the whole output in memory (7.1 GiB RSS for Q8_0,
    2.5x llama-quantize's own peak); the check must cost megabytes, whatever the file's size.
    Measured by the process's own VmHWM (ru_maxrss would carry pytest's peak across exec)."""
    import subprocess
    import sys

    out = quantize_gguf(tiny_bf16_gguf, tmp_path / "q8.gguf", QuantizeOptions(
        quant=get_quant("Q8_0"), threads=2)).path
    script = (
        "import sys\n"
        "import llama_cpp\n"
        "from mathq.convert.gguf_info import read_gguf_summary\n"
        "from mathq.convert.verify import LlamaVocab\n"
        "from mathq.quantize.core import verify_quantized\n"
        "from mathq.recipes.quants import get_quant\n"
        "def hwm():\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "    return 1024 * int(status.split()[0])\n"
        "n = len(read_gguf_summary(sys.argv[1]).tensors)\n"
        "llama_cpp.llama_backend_init()\n"
        "before = hwm()\n"
        "if sys.argv[2] == 'vocab':\n"
        "    LlamaVocab(sys.argv[1]).close()\n"
        "else:\n"
        "    verify_quantized(sys.argv[1], get_quant('Q8_0'), n)\n"
        "print(hwm() - before)\n")

    def grown(what: str) -> int:
        return int(subprocess.run([sys.executable, "-c", script, str(out), what], check=True,
                                  capture_output=True, text=True).stdout.split()[-1])

    # The vocabulary (102,400 tokens) costs the same in both: what verifying adds beyond it
    # must be small beside the weights.
    extra = grown("verify") - grown("vocab")
    assert extra < out.stat().st_size // 4, (extra, out.stat().st_size)
