"""mathq imatrix vs llama-imatrix: the same model and text, tensor by tensor, and speed.

Both run as commands on the same GGUF and text file with the same context and chunk count
(mathq always parses special tokens, so llama-imatrix gets --parse-special). Prints, for
every tensor, the largest relative difference of the normalised values (in_sum2 / counts),
the wall time and tokens per second of each tool with their ratio, and checks that
llama-quantize takes mathq's file (and writes the same bytes as mathq quantize with it).

    .venv/bin/python benchmarks/imatrix.py [--model M.gguf] [--text T.txt] [--ctx 512]
                                           [--chunks 8] [--layers 2] [--threads 2]
    .venv/bin/python benchmarks/imatrix.py --write-reference

--write-reference regenerates tests/fixtures/imatrix/ (llama-imatrix's own matrix of the
tests' tiny_bf16_gguf model on calibration.txt, and provenance.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from gguf import GGUFReader as read_gguf
from tests.conftest import FIXTURES
from tests.ggufbuild import write_tiny_llama_gguf

from benchmarks.peers import CACHE, LLAMA_CPP_PYTHON, timed, tool
from mathq.quantize.core import output_name
from mathq.quantize.imatrix_file import load_imatrix

VOCAB = FIXTURES / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf"
REFERENCE = FIXTURES / "imatrix"
REF_CTX, REF_CHUNKS = 128, 4


def fingerprint(model: Path) -> str:
    """sha256 over tensor names and bytes: what the matrix depends on, not the metadata."""
    h = hashlib.sha256()
    for t in read_gguf(model).tensors:
        h.update(t.name.encode())
        h.update(np.asarray(t.data).tobytes())
    return h.hexdigest()


def llama_imatrix(model: Path, text: Path, out: Path, ctx: int, chunks: int,
                  threads: int) -> tuple[list[str], float]:
    cmd = [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out),
           "--ctx-size", str(ctx), "--chunks", str(chunks), "--parse-special", "--no-ppl",
           "-t", str(threads)]
    seconds, _ = timed(cmd)
    return cmd, seconds


def write_reference() -> None:
    work = CACHE / "imatrix"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-BF16.gguf"
    write_tiny_llama_gguf(model, VOCAB)  # exactly the tests' tiny_bf16_gguf fixture
    out = REFERENCE / "llama-imatrix.gguf"
    text = REFERENCE / "calibration.txt"
    # Run inside the fixture folder so the file records the dataset as "calibration.txt".
    cmd = ["-m", str(model), "-f", text.name, "-o", out.name, "--ctx-size", str(REF_CTX),
           "--chunks", str(REF_CHUNKS), "--parse-special", "--no-ppl", "-t", "2"]
    subprocess.run([str(tool("llama-imatrix")), *cmd], cwd=REFERENCE, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = ["llama-imatrix", *[c if not c.startswith("/") else Path(c).name for c in cmd]]
    provenance = {
        "tool": f"llama-imatrix from llama-cpp-python {LLAMA_CPP_PYTHON}'s vendored llama.cpp",
        "command": cmd, "ctx": REF_CTX, "chunks": REF_CHUNKS,
        "model": "tests.ggufbuild.write_tiny_llama_gguf(path, ggml-vocab-deepseek-llm.gguf) "
                 "with its defaults: the tiny_bf16_gguf test fixture",
        "model_fingerprint": fingerprint(model),
        "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest(),
    }
    (REFERENCE / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) and provenance.json")


def compare(ours: Path, ref: Path) -> float:
    a, b = load_imatrix(ours).entries, load_imatrix(ref).entries
    if sorted(a) != sorted(b):
        raise SystemExit(f"different tensors: {sorted(set(a) ^ set(b))}")
    worst = 0.0
    print(f"{'tensor':<28} {'max rel diff':>12}")
    for name in sorted(b):
        rel = float(np.max(np.abs(a[name] - b[name]) / np.maximum(np.abs(b[name]), 1e-12)))
        worst = max(worst, rel)
        print(f"{name:<28} {rel:12.2e}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-reference", action="store_true")
    ap.add_argument("--model", type=Path, help="GGUF to measure (default: a DeepSeek-shaped "
                    "random model, 4096/11008 wide, --layers deep)")
    ap.add_argument("--text", type=Path, default=REFERENCE / "calibration.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.write_reference:
        write_reference()
        return
    work = CACHE / "imatrix"
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = work / f"deepseek-shaped-{args.layers}L-BF16.gguf"
        if not model.exists():
            print(f"writing {model.name} (4096/11008, vocab 102400, {args.layers} layers)...")
            write_tiny_llama_gguf(model, VOCAB, n_embd=4096, n_ff=11008, n_layer=args.layers,
                                  n_head=32)
    text = args.text
    n_text = len(text.read_text(encoding="utf-8"))
    if n_text < args.ctx * args.chunks * 3:  # repeat short texts to fill the chunks
        text = work / "text.txt"
        body = args.text.read_text(encoding="utf-8")
        text.write_text(body * (args.ctx * args.chunks * 4 // n_text + 1), encoding="utf-8")
    ref, ours = work / "llama-imatrix.gguf", work / "mathq.imatrix.gguf"
    _, t_ref = llama_imatrix(model, text, ref, args.ctx, args.chunks, args.threads)
    mathq = Path(sys.executable).parent / "mathq"
    t_ours, _ = timed([str(mathq), "imatrix", str(model), "-c", str(text), "--ctx",
                       str(args.ctx), "--chunks", str(args.chunks), "--threads",
                       str(args.threads), "--out", str(ours), "--quiet",
                       "--smoke-suite", str(FIXTURES / "math500" / "test.jsonl")])
    worst = compare(ours, ref)
    tokens = args.ctx * args.chunks
    print(f"\nmodel {model.name}, {args.chunks} chunks x {args.ctx} tokens, "
          f"threads {args.threads}")
    print(f"llama-imatrix {t_ref:7.1f}s {tokens / t_ref:8.1f} tok/s")
    print(f"mathq imatrix {t_ours:7.1f}s {tokens / t_ours:8.1f} tok/s   "
          f"ratio {t_ours / t_ref:.2f}x (wall, including start-up)")
    print(f"largest per-column relative difference: {worst:.2e} (target < 1e-2)")
    # llama-quantize takes mathq's file, and agrees with mathq quantize given it.
    q_ref, q_dir = work / "llama-quantize-Q4_K_M.gguf", work / "mq" / model.stem
    subprocess.run([str(tool("llama-quantize")), "--imatrix", str(ours), str(model),
                    str(q_ref), "Q4_K_M", str(args.threads)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([str(mathq), "quantize", str(model), "-Q", "Q4_K_M", "--imatrix", str(ours),
                    "--out-dir", str(q_dir), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    produced = q_dir / output_name(model, "Q4_K_M")
    same = [t.data.tobytes() for t in read_gguf(q_ref).tensors] == \
        [t.data.tobytes() for t in read_gguf(produced).tensors]
    print(f"llama-quantize --imatrix <mathq's file>: ok; tensors identical to mathq quantize: "
          f"{same}")


if __name__ == "__main__":
    main()
