"""Shared test set-up: every test gets its own build root and no progress bars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point the build root at a temp dir and keep the Hub offline and quiet."""
    monkeypatch.setenv("MATHQ_BUILD_DIR", str(tmp_path_factory.mktemp("build")))
    monkeypatch.setenv("MATHQ_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at its first import: a test that imported it
    # under HF_HUB_OFFLINE=1 must not leave every later test offline.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"))


@pytest.fixture(scope="session")
def tiny_bf16_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BF16 LLaMA GGUF with DeepSeek's real vocabulary (widths of 256 so that
    k-quants apply to every matrix instead of falling back)."""
    from tests.ggufbuild import write_tiny_llama_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny-BF16.gguf"
    write_tiny_llama_gguf(path, FIXTURES / "deepseek-llm-tokenizer"
                          / "ggml-vocab-deepseek-llm.gguf")
    return path


DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-demo"


@pytest.fixture(scope="session")
def demo_bf16_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled, trained tiny demo model converted by mathq's own converter."""
    from mathq.convert.converter import ConvertOptions, convert_checkpoint

    path = tmp_path_factory.mktemp("demo") / "tiny-demo-BF16.gguf"
    convert_checkpoint(DEMO_MODEL, path, ConvertOptions(pre_tokenizer="deepseek-llm"))
    return path


@pytest.fixture(scope="session")
def tiny_quant_ggufs(demo_bf16_gguf: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model as BF16 and quantized by mathq to Q8_0 and Q4_K_M, once per session."""
    from mathq.quantize.core import QuantizeOptions, quantize_gguf
    from mathq.recipes.quants import get_quant

    out = tmp_path_factory.mktemp("tiny-quants")
    ggufs = {"BF16": demo_bf16_gguf}
    for q in ("Q8_0", "Q4_K_M"):
        ggufs[q] = quantize_gguf(demo_bf16_gguf, out / f"tiny-{q}.gguf",
                                 QuantizeOptions(get_quant(q))).path
    return ggufs


@pytest.fixture(scope="session")
def tiny_quantized(tiny_quant_ggufs: dict[str, Path]) -> dict[str, Path]:
    """Only the quantized files of ``tiny_quant_ggufs`` (what publish tests upload)."""
    return {q: p for q, p in tiny_quant_ggufs.items() if q != "BF16"}
