"""Check a freshly written GGUF before it gets its final name.

Three checks, all cheap next to the conversion itself:

1. Index: gguf-py's reader reopens the file; every tensor's name, order, type, shape,
   size and offset must be what was planned.
2. Tokenizer: llama.cpp loads the file vocab-only and tokenizes :data:`CHECK_TEXTS`
   (math prose, LaTeX, digits, Chinese, odd whitespace, DeepSeek's chain-of-thought
   suffixes, special tokens); Hugging Face ``tokenizers`` does the same from
   ``tokenizer.json``. Any difference is an error: it means the pre-tokenizer name, the
   token list or a special token is wrong, and the model would read prompts differently
   from how it was trained.
3. Bytes: byte-copied tensors must start and end with their source's bytes.

The first two read only the header, which is final once the data section is begun, so the
converter runs them in a thread while tensors are still being copied
(:func:`start_header_checks`); the third runs after the last tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mathq.convert.gguf_info import read_gguf_header
from mathq.errors import GGUFError
from mathq.progress import Progress, ProgressCallback, no_progress

if TYPE_CHECKING:
    from mathq.convert.checkpoint import Checkpoint
    from mathq.convert.writer import PlannedTensor

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# Texts on which a wrong pre-tokenizer, token list or special token shows up.
CHECK_TEXTS: tuple[str, ...] = (
    "Let $f(x) = 3x^2 - 5x + 2$. Find all real $x$ such that $f(x) = 0$.",
    r"Compute $\displaystyle\sum_{k=1}^{100} \frac{1}{k(k+1)}$ and simplify "
    r"$\sqrt{\frac{a^2+b^2}{2}}\ge\frac{a+b}{2}$, $\theta,\alpha\in[0,\pi)$, "
    r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}, \{x\mid x>0\}, \boxed{\tfrac{3}{4}}.",
    "12345678901234567890 3.14159 -0.5e-10 1,000,000 2^{10}=1024 007 ½ ² ³ ٣ ३",
    "已知函数 f(x)=x²，求 f(3) 的值。答案是九。数学、代数与几何；「证明」如下：",
    "  leading spaces\ttab\t\tdouble tab\n\nnew paragraph \r\n crlf   trailing   \n\n\n",
    "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "\n请通过逐步推理来解答问题,并把最终答案放置于\\boxed{}中。",
    f"{BOS}User: What is $1+1$?\n\nAssistant: $2${EOS}User: And 2+2?\n\nAssistant:",
    "Ÿ ø ö ú ÿ õ ÷ û ý À ù Á þ ü Ωmega Kelvin K ℭ Å — “quotes” ‘single’ … emoji 🙂🧮",
    "def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)  # fib\n",
)


@dataclass(frozen=True)
class VerifyResult:
    """What verification looked at."""

    tensors_checked: int
    bytes_spot_checked: int
    texts_checked: int
    tokens_compared: int


def verify_gguf(
    path: Path,
    planned: Sequence[PlannedTensor],
    hf_dir: Path,
    ckpt: Checkpoint | None = None,
    progress: ProgressCallback = no_progress,
) -> VerifyResult:
    """Run every check on a finished file; raise :class:`GGUFError` at the first difference."""
    progress(Progress("verify", 0, 3, "checks", item="tensor index"))
    n_tensors, data_start = check_index(path, planned)
    progress(Progress("verify", 1, 3, "checks", item="tokenizer"))
    n_tokens = check_tokenizer(path, Path(hf_dir) / "tokenizer.json", CHECK_TEXTS)
    progress(Progress("verify", 2, 3, "checks", item="tensor bytes"))
    spot = check_tensor_bytes(path, planned, data_start, ckpt)
    progress(Progress("verify", 3, 3, "checks"))
    return VerifyResult(n_tensors, spot, len(CHECK_TEXTS), n_tokens)


def start_header_checks(
    path: Path, planned: Sequence[PlannedTensor], hf_dir: Path
) -> Future[VerifyResult]:
    """Run :func:`check_header` in a thread while the data section is still being written.

    Header, metadata and tensor index are final once the writer has begun the data section
    (and the file has its final size), and neither check reads tensor data, so they overlap
    the copy instead of following it; the byte checks run after the last tensor.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathq-verify")
    try:
        return pool.submit(check_header, path, tuple(planned), hf_dir)
    finally:
        pool.shutdown(wait=False)


def check_header(path: Path, planned: Sequence[PlannedTensor], hf_dir: Path) -> VerifyResult:
    """Tensor index (gguf's reader) and tokenization (llama.cpp vs tokenizers)."""
    n_tensors, _ = check_index(path, planned)
    n_tokens = check_tokenizer(path, Path(hf_dir) / "tokenizer.json", CHECK_TEXTS)
    return VerifyResult(n_tensors, 0, len(CHECK_TEXTS), n_tokens)


def check_index(path: Path, planned: Sequence[PlannedTensor]) -> tuple[int, int]:
    """Reopen with mathq's header reader and compare the tensor index with the plan.

    Returns the number of tensors and the offset of the data section.
    """
    from gguf import GGMLQuantizationType

    try:
        header = read_gguf_header(path)
    except (GGUFError, OSError) as e:
        raise GGUFError(
            f"verification failed: cannot read {path}: {e}",
            "this is a bug in mathq's writer; please report it",
        ) from e
    tensors = header.summary.tensors
    if len(tensors) != len(planned):
        raise GGUFError(
            f"verification failed: {path.name} holds {len(tensors)} tensors, "
            f"expected {len(planned)}",
            "this is a bug; please report it",
        )
    for got, want in zip(tensors, planned, strict=True):
        actual = (
            got.name,
            GGMLQuantizationType[got.type],
            tuple(reversed(got.shape)),
            got.n_bytes,
            got.offset - header.data_offset,
        )
        expected = (want.name, want.ggml_type, want.shape, want.nbytes, want.offset)
        if actual != expected:
            raise GGUFError(
                f"verification failed: tensor index entry {actual} differs from "
                f"the plan {expected}",
                "this is a bug; please report it",
            )
    return len(planned), header.data_offset


def check_tensor_bytes(
    path: Path,
    planned: Sequence[PlannedTensor],
    data_start: int,
    ckpt: Checkpoint | None,
    spot_bytes: int = 4096,
) -> int:
    """Byte-copied tensors must begin and end with their source's bytes."""
    sources = _byte_copied_sources(planned, ckpt)
    spot = 0
    for t in planned:
        if (src := sources.get(t.name)) is not None:
            spot += _spot_check(path, data_start + t.offset, src, t.nbytes, spot_bytes)
    return spot


def _byte_copied_sources(
    planned: Sequence[PlannedTensor], ckpt: Checkpoint | None
) -> dict[str, tuple[Path, int]]:
    """GGUF name -> (source file, offset) for tensors that were copied byte for byte."""
    if ckpt is None:
        return {}
    from mathq.convert.hfconfig import load_hparams
    from mathq.convert.safetensors_reader import SOURCE_TYPES
    from mathq.convert.tensor_map import Transform, expected_tensors

    by_gguf = {m.gguf_name: m for m in expected_tensors(load_hparams(ckpt.hf_dir)).values()}
    out = {}
    for t in planned:
        m = by_gguf.get(t.name)
        entry = ckpt.tensors.get(m.hf_name) if m else None
        if (
            m
            and entry
            and m.transform is Transform.COPY
            and SOURCE_TYPES.get(entry.dtype) == t.ggml_type
        ):
            out[t.name] = (entry.path, entry.begin)
    return out


def _spot_check(path: Path, offset: int, src: tuple[Path, int], nbytes: int, n: int) -> int:
    n = min(n, nbytes)
    with open(path, "rb") as a, open(src[0], "rb") as b:
        for where in sorted({0, nbytes - n}):
            a.seek(offset + where)
            b.seek(src[1] + where)
            if a.read(n) != b.read(n):
                raise GGUFError(
                    f"verification failed: bytes at {offset + where} of {path.name} "
                    f"differ from {src[0].name}",
                    "this is a bug; please report it",
                )
    return 2 * n if nbytes > n else n


class LlamaVocab:
    """A GGUF's vocabulary loaded by llama.cpp alone (``vocab_only``), for tokenizing."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._lib = llama_cpp
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise GGUFError(
                f"verification failed: llama.cpp cannot load the vocabulary of {path}",
                "check tokenizer.ggml.pre is a name llama.cpp knows",
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            raise GGUFError(
                f"llama.cpp needs {-n} tokens for a {len(data)}-byte text",
                "this is a bug; please report it",
            )
        return list(buf[:n])

    def close(self) -> None:
        """Free the model."""
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaVocab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (len of the shorter list if one is a prefix)."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def check_tokenizer(path: Path, tokenizer_json: Path, texts: Sequence[str]) -> int:
    """Tokenize ``texts`` with llama.cpp (from the GGUF) and ``tokenizers``; must agree."""
    from mathq.convert.vocab import load_hf_tokenizer

    hf = load_hf_tokenizer(tokenizer_json)
    compared = 0
    with LlamaVocab(path) as ll:
        cases = [(t, False) for t in texts] + [(texts[0], True)]
        for text, add_special in cases:
            want = hf.encode(text, add_special_tokens=add_special).ids
            got = ll.tokenize(text, add_special=add_special)
            if got != want:
                i = first_difference(got, want)
                raise GGUFError(
                    f"verification failed: llama.cpp tokenizes {text[:40]!r} differently from "
                    f"tokenizer.json at token {i} (llama.cpp {got[i : i + 3]}, "
                    f"tokenizers {want[i : i + 3]})",
                    "the pre-tokenizer name or the token list is wrong for this tokenizer; "
                    "check --pre-tokenizer",
                )
            compared += len(want)
    return compared
