"""Bad input never crashes, hangs or leaves debris: a table of hostile cases, one per row.

Each row runs the real command line (``mathq ...`` in process, as tests/clirun.py does) in
its own folder holding a copy of a built demo model, a read-only folder, a full disk and
whatever the row sets up (truncated, oversized and garbage files, named pipes, Unicode and
path-traversal names), against misbehaving servers where it talks to one. Every row
asserts:

- the exit code: 2 for bad input, 1 for a failure (0 for hostile input that is handled);
- no traceback, and exactly one ``Error:`` line naming the problem, with the fix in
  parentheses (Click's own usage errors say ``Try 'mathq CMD --help'`` instead;
  ``modelfile --check`` names each problem as ``FILE:LINE: PROBLEM`` above it);
- nothing left behind that was not there before, and every input unchanged (a snapshot
  of the whole folder, file contents included, before and after);
- where a row gives a limit, the time it took.

The kill tests (SIGKILL and SIGTERM during ``build``) are in test_kills.py.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from tests.hostile.conftest import World
from tests.hostile.harness import EACCES, make_fifo, simulate_os_error, snapshot

Setup = Callable[[World], None]


@dataclass(frozen=True)
class Case:
    """One hostile input: the command line, the exit code and words the error must hold."""

    command: str
    name: str
    args: tuple[str, ...]
    code: int
    says: str
    setup: Setup | None = None
    writes: tuple[str, ...] = ()  # outputs a successful row may add (relative to the world)
    seconds: float | None = None  # a limit on the wall time
    env: tuple[tuple[str, str], ...] = ()
    patch: tuple[tuple[str, object], ...] = ()  # module attributes set for the row
    denied: str = ""  # a folder (relative to the world) that may not be written to
    unreadable: str = ""  # a folder whose files may not even be read


def write(rel: str, data: bytes | str) -> Setup:
    def setup(w: World) -> None:
        path = w.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def truncated(src: str, rel: str, keep: int) -> Setup:
    def setup(w: World) -> None:
        data = Path(w.values()[src]).read_bytes()
        (w.root / rel).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return setup


def fifo(rel: str) -> Setup:
    return lambda w: make_fifo(w.root / rel) and None


def both(*steps: Setup) -> Setup:
    def setup(w: World) -> None:
        for step in steps:
            step(w)
    return setup


def result_line(answer: str, completion: str, **extra: object) -> str:
    return json.dumps({"id": "1", "answer": answer, "completion": completion, **extra}) + "\n"


GOOD_LINE = result_line("5", "so \\boxed{5}")
BAD_TEMPLATE = 'FROM ./m.gguf\nTEMPLATE """{}"""\n'
RECIPE_TEXT = (Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.toml").read_text()
LOCAL_RECIPE = RECIPE_TEXT.replace('"../models/tiny-demo"', '"{repo}/models/tiny-demo"')


def recipe_with(rel: str, old: str, new: str) -> Setup:
    def setup(w: World) -> None:
        text = RECIPE_TEXT.replace('"../models/', f'"{Path(__file__).resolve().parents[2]}'
                                   '/models/')
        assert old in text, old
        (w.root / rel).write_text(text.replace(old, new, 1), encoding="utf-8")
    return setup


G = "{bf16}"
# huggingface_hub reads HF_HUB_OFFLINE when it is first imported; rows that talk to a Hub
# set its constant too, whatever the session imported it under.
ONLINE = (("huggingface_hub.constants.HF_HUB_OFFLINE", False),)


def hub_at(url: str) -> tuple[tuple[str, str], ...]:
    return (("HF_HUB_OFFLINE", "0"), ("HF_ENDPOINT", url))
CASES: list[Case] = [
    # --- grade ---------------------------------------------------------------------------
    Case("grade", "read-only --out folder", ("grade", "{w}/r.jsonl", "--out", "{ro}/x.jsonl"),
         1, "read-only file system", write("r.jsonl", GOOD_LINE)),
    Case("grade", "read-only input rewritten in place", ("grade", "{ro}/in.jsonl"), 1,
         "read-only file system"),
    Case("grade", "--out on a full disk", ("grade", "{w}/r.jsonl", "--out", "{full}/x.jsonl"),
         1, "cannot write", both(write("r.jsonl", "".join(
             GOOD_LINE.replace('"id": "1"', f'"id": "{i}"') for i in range(2000))),
                                 write("full/pad", b"\0" * 250_000))),
    Case("grade", "--out below a file", ("grade", "{w}/r.jsonl", "--out", "{w}/r.jsonl/x"),
         1, "r.jsonl: it is a file, not a folder", write("r.jsonl", GOOD_LINE)),
    Case("grade", "empty file", ("grade", "{w}/e.jsonl"), 2, "it is empty", write("e.jsonl", "")),
    Case("grade", "blank lines only", ("grade", "{w}/e.jsonl"), 2, "it is empty",
         write("e.jsonl", "\n \n\t\n")),
    Case("grade", "a line that is not JSON", ("grade", "{w}/r.jsonl"), 2,
         "r.jsonl:2: not valid JSON", write("r.jsonl", GOOD_LINE + "{oops\n")),
    Case("grade", "an answer of the wrong type", ("grade", "{w}/r.jsonl"), 2,
         "field 'answer' must be a string, got a number",
         write("r.jsonl", '{"id": 1, "answer": 5, "completion": "x"}\n')),
    Case("grade", "a subject that is a list", ("grade", "{w}/r.jsonl"), 2,
         "field 'subject' must be a string, got an array",
         write("r.jsonl", result_line("5", "x", subject=["a"]))),
    Case("grade", "an id that is an object", ("grade", "{w}/r.jsonl"), 2,
         "field 'id' must be a string or a number",
         write("r.jsonl", '{"id": {}, "answer": "5", "completion": "x"}\n')),
    Case("grade", "a line that is an array", ("grade", "{w}/r.jsonl"), 2,
         "expected a JSON object, got an array", write("r.jsonl", "[1, 2]\n")),
    Case("grade", "a missing field", ("grade", "{w}/r.jsonl"), 2, "missing field 'completion'",
         write("r.jsonl", '{"id": 1, "answer": "5"}\n')),
    Case("grade", "binary garbage", ("grade", "{w}/r.jsonl"), 2, "not UTF-8 text",
         write("r.jsonl", b"\x89PNG\r\n\x1a\n\xff\xfe\x00")),
    Case("grade", "JSON nested 100,000 deep", ("grade", "{w}/r.jsonl"), 2,
         "nested too deeply", write("r.jsonl", "[" * 100_000 + "\n")),
    Case("grade", "a named pipe", ("grade", "{w}/p.jsonl"), 2, "not a regular file",
         fifo("p.jsonl"), seconds=10),
    Case("grade", "a folder", ("grade", "{w}"), 2, "is a directory"),
    Case("grade", "a missing file", ("grade", "{w}/nope.jsonl"), 2, "does not exist"),
    Case("grade", "an unknown --problems suite", ("grade", "{w}/r.jsonl", "--problems",
                                                   "no-such-suite"), 2, "no-such-suite",
         write("r.jsonl", GOOD_LINE)),
    Case("grade", "a 10 MB answer within --timeout + 1 s",
         ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl", "--timeout", "2"), 0, "",
         write("r.jsonl", result_line("5", "so \\boxed{" + "1" * 10_000_000 + "}")),
         writes=("o.jsonl",), seconds=3),
    Case("grade", "a 30,000-digit answer", ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl",
                                            "--timeout", "2"), 0, "",
         write("r.jsonl", result_line("5", "\\boxed{" + "7" * 30_000 + "}")),
         writes=("o.jsonl",), seconds=3),
    Case("grade", "a power tower no computer finishes",
         ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl", "--timeout", "1"), 0, "",
         write("r.jsonl", result_line("5", "\\boxed{9^{9^{9^{9}}}}")), writes=("o.jsonl",),
         seconds=2.5),
    Case("grade", "a million unclosed boxes", ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl"),
         0, "", write("r.jsonl", result_line("5", "\\boxed{" * 1_000_000)),
         writes=("o.jsonl",), seconds=6),
    Case("grade", "300,000 nested boxes", ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl"),
         0, "", write("r.jsonl", result_line("5", "\\boxed{" * 300_000 + "5" + "}" * 300_000)),
         writes=("o.jsonl",), seconds=6),
    Case("grade", "a huge gold answer", ("grade", "{w}/r.jsonl", "--out", "{w}/o.jsonl",
                                         "--timeout", "2"), 0, "",
         write("r.jsonl", result_line("1," * 1_000_000, "\\boxed{1} and \\boxed{2}")),
         writes=("o.jsonl",), seconds=6),
    Case("grade", "a Unicode path", ("grade", "{w}/résultats ∑/r.jsonl"), 0, "",
         write("résultats ∑/r.jsonl", GOOD_LINE), writes=("résultats ∑/r.jsonl",)),
    Case("grade", "--out in a folder without write permission",
         ("grade", "{w}/r.jsonl", "--out", "{w}/locked/x.jsonl"), 1, "permission denied",
         write("r.jsonl", GOOD_LINE), denied="locked"),
    Case("grade", "an unreadable results file", ("grade", "{w}/secret/r.jsonl"), 2,
         "permission denied", write("secret/r.jsonl", GOOD_LINE), unreadable="secret"),
    # --- modelfile ---------------------------------------------------------------------
    Case("modelfile", "if without end", ("modelfile", "--check", "{w}/M"), 1,
         "M:3: TEMPLATE: unexpected EOF",
         both(write("m.gguf", b""), write("M", BAD_TEMPLATE.format("{{ if .System }}\n")))),
    Case("modelfile", "an unclosed action", ("modelfile", "--check", "{w}/M"), 1,
         "M:2: TEMPLATE: unclosed action",
         both(write("m.gguf", b""), write("M", BAD_TEMPLATE.format("{{ .Content ")))),
    Case("modelfile", "an unknown function", ("modelfile", "--check", "{w}/M"), 1,
         'function "upper" not defined',
         both(write("m.gguf", b""), write("M", BAD_TEMPLATE.format("{{ upper .Content }}")))),
    Case("modelfile", "an extra end", ("modelfile", "--check", "{w}/M"), 1,
         "unexpected {{end}}",
         both(write("m.gguf", b""), write("M", BAD_TEMPLATE.format("x{{ end }}")))),
    Case("modelfile", "TEMPLATE swallowing a later LICENSE", ("modelfile", "--check", "{w}/M"),
         1, 'M:2: TEMPLATE opened with """ is not closed before line 3',
         both(write("m.gguf", b""),
              write("M", 'FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\nLICENSE """MIT"""\n'))),
    Case("modelfile", "FROM a missing GGUF", ("modelfile", "--check", "{w}/M"), 1,
         "M:1: FROM ./nonexistent.gguf: no such file",
         write("M", "FROM ./nonexistent.gguf\n")),
    Case("modelfile", "10,000 nested ifs", ("modelfile", "--check", "{w}/M"), 1,
         "nested deeper",
         both(write("m.gguf", b""),
              write("M", BAD_TEMPLATE.format("{{ if .X }}" * 10_000 + "{{ end }}" * 10_000))),
         seconds=20),
    Case("modelfile", "a binary Modelfile", ("modelfile", "--check", "{w}/M"), 1,
         "not valid UTF-8", write("M", b"FROM x\n\xff\xfe\x00")),
    Case("modelfile", "an empty Modelfile", ("modelfile", "--check", "{w}/M"), 1,
         "no FROM instruction", write("M", "")),
    Case("modelfile", "--check a named pipe", ("modelfile", "--check", "{w}/pipe"), 2,
         "not a regular file", fifo("pipe"), seconds=10),
    Case("modelfile", "--check a missing file", ("modelfile", "--check", "{w}/none"), 2,
         "does not exist"),
    Case("modelfile", "read-only --out", ("modelfile", "tiny-demo", "--out", "{ro}"), 1,
         "read-only file system"),
    Case("modelfile", "--out without write permission",
         ("modelfile", "tiny-demo", "--out", "{w}/locked"), 1, "permission denied",
         denied="locked"),
    Case("modelfile", "--check an unreadable file", ("modelfile", "--check", "{w}/secret/M"),
         1, "permission denied", write("secret/M", "FROM x\n"), unreadable="secret"),
    Case("modelfile", "a tag that is a path", ("modelfile", "tiny-demo", "--tag", "../../evil",
                                               "--out", "{w}/mf"), 2, "../../evil"),
    Case("modelfile", "an unknown recipe", ("modelfile", "no-such-recipe"), 2,
         "no-such-recipe"),
    # --- quantize ----------------------------------------------------------------------
    Case("quantize", "read-only --out-dir", ("quantize", G, "-Q", "Q8_0", "--out-dir", "{ro}"),
         1, "read-only file system (choose a writable --out-dir"),
    Case("quantize", "--out-dir without write permission (chmod 555 for a user)",
         ("quantize", G, "-Q", "Q8_0", "--out-dir", "{w}/locked"), 1,
         "permission denied (choose a writable --out-dir", denied="locked"),
    Case("quantize", "an unreadable input", ("quantize", "{w}/secret/m.gguf", "-Q", "Q8_0",
                                             "--out-dir", "{w}/out"), 1, "permission denied",
         write("secret/m.gguf", b"GGUF"), unreadable="secret"),
    Case("quantize", "a new folder on a read-only disk",
         ("quantize", G, "-Q", "Q8_0", "--out-dir", "{ro}/sub"), 1, "read-only file system"),
    Case("quantize", "--out-dir on a full disk",
         ("quantize", G, "-Q", "Q8_0", "--out-dir", "{full}"), 1, "space"),
    Case("quantize", "an override that is not a regex",
         ("quantize", G, "-Q", "Q8_0", "--tensor-type", "[=Q8_0", "--out-dir", "{w}/out"), 2,
         "is not a regular expression"),
    Case("quantize", "an override with an unknown type",
         ("quantize", G, "--tensor-type", "attn_v=Q9", "--out-dir", "{w}/out"), 2,
         "unknown ggml tensor type 'Q9'"),
    Case("quantize", "an empty -Q", ("quantize", G, "-Q", "", "--out-dir", "{w}/out"), 2,
         "no quantization type given"),
    Case("quantize", "an unknown type", ("quantize", G, "-Q", "Q9_K", "--out-dir", "{w}/out"),
         2, "Q9_K"),
    Case("quantize", "a type that needs a matrix, after one that does not",
         ("quantize", G, "-Q", "Q8_0,IQ2_XXS", "--out-dir", "{w}/out"), 2,
         "IQ2_XXS needs an importance matrix"),
    Case("quantize", "a GGUF cut inside its header",
         ("quantize", "{w}/t.gguf", "-Q", "Q8_0", "--out-dir", "{w}/out"), 1,
         "is cut short: it ends (at byte 100) inside its metadata",
         truncated("bf16", "t.gguf", 100)),
    Case("quantize", "a GGUF cut inside its tensor data",
         ("quantize", "{w}/t.gguf", "-Q", "Q8_0", "--out-dir", "{w}/out"), 1,
         "runs past the end of the file", truncated("bf16", "t.gguf", -1000)),
    Case("quantize", "a text file named .gguf",
         ("quantize", "{w}/t.gguf", "-Q", "Q8_0", "--out-dir", "{w}/out"), 1,
         "not a GGUF file", write("t.gguf", "hello\n")),
    Case("quantize", "an empty .gguf", ("quantize", "{w}/t.gguf", "-Q", "Q8_0"), 1,
         "not a GGUF file", write("t.gguf", b"")),
    Case("quantize", "a named pipe as input", ("quantize", "{w}/p.gguf", "-Q", "Q8_0"), 2,
         "not a regular file", fifo("p.gguf"), seconds=10),
    Case("quantize", "a missing input", ("quantize", "{w}/none.gguf", "-Q", "Q8_0"), 2,
         "does not exist"),
    Case("quantize", "an already quantized input", ("quantize", "{q8}", "-Q", "Q4_K_M",
                                                   "--out-dir", "{w}/out"), 1,
         "already quantized"),
    Case("quantize", "a truncated importance matrix",
         ("quantize", G, "-Q", "Q4_K_M", "--imatrix", "{w}/m.gguf", "--out-dir", "{w}/out"), 1,
         "cut short", truncated("bf16", "m.gguf", 200)),
    Case("quantize", "a garbage importance matrix",
         ("quantize", G, "-Q", "Q4_K_M", "--imatrix", "{w}/m.dat", "--out-dir", "{w}/out"), 1,
         "not a usable importance matrix", write("m.dat", b"\x07\x00\x00\x00garbage")),
    Case("quantize", "a missing --tensor-type-file",
         ("quantize", G, "-Q", "Q4_K_M", "--tensor-type-file", "{w}/none.txt", "--out-dir",
          "{w}/out"), 2, "none.txt does not exist"),
    Case("quantize", "an empty --tensor-type-file",
         ("quantize", G, "-Q", "Q4_K_M", "--tensor-type-file", "{w}/t.txt", "--out-dir",
          "{w}/out"), 2, "t.txt is empty", write("t.txt", "\n\n")),
    Case("quantize", "a --tensor-type-file line without a type",
         ("quantize", G, "-Q", "Q4_K_M", "--tensor-type-file", "{w}/t.txt", "--out-dir",
          "{w}/out"), 2, "expected PATTERN=TYPE", write("t.txt", "attn_v=Q8_0\nffn_down\n")),
    Case("quantize", "a --tensor-type-file with an unknown type",
         ("quantize", G, "-Q", "Q4_K_M", "--tensor-type-file", "{w}/t.txt", "--out-dir",
          "{w}/out"), 2, "unknown ggml tensor type 'Q9_K'", write("t.txt", "attn_v=Q9_K\n")),
    Case("quantize", "a binary --tensor-type-file",
         ("quantize", G, "-Q", "Q4_K_M", "--tensor-type-file", "{w}/t.txt", "--out-dir",
          "{w}/out"), 2, "cannot read tensor type file", write("t.txt", b"\xff\xfe\x00=")),
    # --- tune --------------------------------------------------------------------------
    Case("tune", "a size that is not one", ("tune", "tiny-demo", "--size", "big"), 2,
         "'--size': 'big' is not a size"),
    Case("tune", "a budget below the smallest mix", ("tune", "tiny-demo", "--size", "100KB"),
         2, "below the smallest mix of the candidate types"),
    Case("tune", "a budget above BF16", ("tune", "tiny-demo", "--size", "1GiB"), 2,
         "is not below the BF16 file"),
    Case("tune", "an unknown candidate type",
         ("tune", "tiny-demo", "--match", "Q4_K_M", "--types", "Q4_K,Q9_K"), 2,
         "--types Q9_K: not a type the tuner can choose (choose from Q2_K"),
    Case("tune", "a type that needs a matrix, without one",
         ("tune", "tiny-demo", "--bpw", "4", "--types", "IQ2_XXS,Q4_K"), 2,
         "--types IQ2_XXS needs an importance matrix"),
    Case("tune", "an unknown --match", ("tune", "tiny-demo", "--match", "Q9_K"), 2,
         "unknown quantization type 'Q9_K'"),
    Case("tune", "two budgets", ("tune", "tiny-demo", "--match", "Q4_K_M", "--bpw", "4"), 2,
         "give exactly one budget"),
    # --- convert -----------------------------------------------------------------------
    Case("convert", "read-only --out", ("convert", "tiny-demo", "--out", "{ro}/x.gguf"), 1,
         "read-only file system"),
    Case("convert", "a checkpoint with a truncated safetensors",
         ("convert", "{w}/ck", "--out", "{w}/o.gguf"), 1, "truncated",
         lambda w: _checkpoint(w, cut=-100)),
    Case("convert", "a checkpoint whose safetensors header is garbage",
         ("convert", "{w}/ck", "--out", "{w}/o.gguf"), 1, "model.safetensors",
         lambda w: _checkpoint(w, header=b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{" * 32)),
    Case("convert", "a checkpoint with garbage config.json",
         ("convert", "{w}/ck", "--out", "{w}/o.gguf"), 1, "config.json",
         lambda w: _checkpoint(w, config=b"\xff\xfe not json")),
    Case("convert", "a checkpoint with garbage tokenizer.json",
         ("convert", "{w}/ck", "--out", "{w}/o.gguf"), 1, "tokenizer.json",
         lambda w: _checkpoint(w, tokenizer=b"[1, 2")),
    Case("convert", "an empty folder", ("convert", "{w}/ck", "--out", "{w}/o.gguf"), 1,
         "config.json", lambda w: (w.root / "ck").mkdir()),
    Case("convert", "a recipe whose name climbs out of the build folder",
         ("convert", "{w}/evil.toml"), 2, "name",
         recipe_with("evil.toml", 'name = "tiny-demo"', 'name = "../../evil"')),
    # --- download ----------------------------------------------------------------------
    Case("download", "offline", ("download", "deepseek-math-7b-rl"), 1, "HF_HUB_OFFLINE is set"),
    Case("download", "a recipe with nothing to download", ("download", "tiny-demo"), 2,
         "nothing to download"),
    Case("download", "a Hub that answers garbage", ("download", "deepseek-math-7b-rl"), 1,
         "{url_garbage}", env=hub_at("{url_garbage}"), patch=ONLINE),
    Case("download", "a Hub that resets", ("download", "deepseek-math-7b-rl"), 1,
         "{url_reset}", env=hub_at("{url_reset}"), patch=ONLINE),
    Case("download", "a Hub that answers HTML", ("download", "deepseek-math-7b-rl"), 1,
         "{url_notjson}", env=hub_at("{url_notjson}"), patch=ONLINE),
    Case("download", "a Hub that fails with 500", ("download", "deepseek-math-7b-rl"), 1,
         "{url_http500}", env=hub_at("{url_http500}"), patch=ONLINE),
    Case("download", "no Hub at all", ("download", "deepseek-math-7b-rl"), 1,
         "{url_closed}", env=hub_at("{url_closed}"), patch=ONLINE),
    Case("download", "read-only --dir", ("download", "deepseek-math-7b-rl", "--dir", "{ro}/hf"),
         1, "read-only file system", env=hub_at("{url_closed}"), patch=ONLINE),
    # --- smoke -------------------------------------------------------------------------
    Case("smoke", "--endpoint that is not a URL", ("smoke", "tiny-demo", "--endpoint", "notaurl"),
         2, "is not an http(s) URL"),
    Case("smoke", "--endpoint with a bad port",
         ("smoke", "tiny-demo", "--endpoint", "http://127.0.0.1:99999"), 2,
         "is not an http(s) URL"),
    Case("smoke", "--ollama that is not a URL", ("smoke", "tiny-demo", "--ollama", "ftp://x"),
         2, "is not an http(s) URL"),
    Case("smoke", "an unreachable endpoint", ("smoke", "tiny-demo", "--endpoint", "{url_closed}",
                                              "--n", "2"), 1, "cannot reach"),
    Case("smoke", "an endpoint that hangs", ("smoke", "tiny-demo", "--endpoint", "{url_hang}",
                                             "--n", "2", "--timeout", "1"), 1,
         "did not answer in time", seconds=8),
    Case("smoke", "an endpoint that trickles forever",
         ("smoke", "tiny-demo", "--endpoint", "{url_trickle}", "--n", "2", "--timeout", "1"),
         1, "within 1 s", seconds=8),
    Case("smoke", "an endpoint that resets", ("smoke", "tiny-demo", "--endpoint", "{url_reset}",
                                              "--n", "2"), 1, "{url_reset}"),
    Case("smoke", "an endpoint that answers garbage",
         ("smoke", "tiny-demo", "--endpoint", "{url_garbage}", "--n", "2"), 1, "{url_garbage}"),
    Case("smoke", "an endpoint that answers HTML",
         ("smoke", "tiny-demo", "--endpoint", "{url_notjson}", "--n", "2"), 1, "not JSON"),
    Case("smoke", "an Ollama that answers 500",
         ("smoke", "tiny-demo", "--ollama", "{url_http500}", "--n", "2"), 1, "{url_http500}"),
    Case("smoke", "an Ollama that hangs",
         ("smoke", "tiny-demo", "--ollama", "{url_hang}", "--n", "2", "--timeout", "1"), 1,
         "did not answer in time", seconds=8),
    Case("smoke", "an Ollama that trickles forever",
         ("smoke", "tiny-demo", "--ollama", "{url_trickle}", "--n", "2", "--timeout", "1"), 1,
         "within 1 s", seconds=8),
    Case("smoke", "a suite file of garbage", ("smoke", "tiny-demo", "--suite", "{w}/s.jsonl"), 2,
         "s.jsonl", write("s.jsonl", b"\x00\x01garbage\n")),
    Case("smoke", "an empty suite file", ("smoke", "tiny-demo", "--suite", "{w}/s.jsonl"), 2,
         "s.jsonl", write("s.jsonl", "")),
    Case("smoke", "a variant never built", ("smoke", "tiny-demo", "-Q", "Q2_K", "--n", "2"), 1,
         "no Q2_K GGUF"),
    Case("smoke", "read-only --out-dir", ("smoke", "tiny-demo", "-Q", "Q8_0", "--n", "2",
                                          "--out-dir", "{ro}"),
         1, "read-only file system"),
    # --- publish -----------------------------------------------------------------------
    Case("publish", "offline with --hf-repo", ("publish", "tiny-demo", "--hf-repo", "me/x",
                                               "--tag", "latest"), 1, "HF_HUB_OFFLINE is set"),
    Case("publish", "a dry run writes nothing", ("publish", "tiny-demo", "--no-push", "--tag",
                                                 "latest", "--dry-run"), 0, ""),
    Case("publish", "a namespace with a slash", ("publish", "tiny-demo", "--namespace", "a/b",
                                                 "--tag", "latest"), 2, "namespace"),
    Case("publish", "a repo id with spaces", ("publish", "tiny-demo", "--hf-repo", "me/x y",
                                              "--dry-run"), 2, "not a valid repo id"),
    Case("publish", "a tag the recipe lacks", ("publish", "tiny-demo", "--no-push", "--tag",
                                               "../x"), 2, "../x"),
    Case("publish", "an Ollama that hangs", ("publish", "tiny-demo", "--no-push", "--tag",
                                             "latest", "--ollama-host", "{url_hang}"), 1,
         "did not answer in time", seconds=10,
         patch=(("mathq.publish.ollama_api.QUICK_TIMEOUT_S", 1.0),)),
    Case("publish", "an Ollama that answers garbage",
         ("publish", "tiny-demo", "--no-push", "--tag", "latest", "--ollama-host",
          "{url_garbage}"), 1, "{url_garbage}"),
    Case("publish", "no Ollama at all", ("publish", "tiny-demo", "--no-push", "--tag", "latest",
                                         "--ollama-host", "{url_closed}"), 1, "cannot connect"),
    # --- build -------------------------------------------------------------------------
    Case("build", "read-only --build-dir", ("build", "tiny-demo", "--files-only", "-Q", "Q8_0",
                                            "--build-dir", "{ro}"), 1,
         "read-only file system (choose a writable --build-dir"),
    Case("build", "--build-dir without write permission",
         ("build", "tiny-demo", "--files-only", "-Q", "Q8_0", "--build-dir", "{w}/locked"), 1,
         "permission denied", denied="locked"),
    Case("build", "a Unicode --build-dir", ("build", "tiny-demo", "--files-only", "-Q", "Q8_0",
                                            "--build-dir", "{w}/bâtiment ∑"), 0, "",
         writes=("bâtiment ∑/",), seconds=30),
    Case("build", "an unknown recipe", ("build", "no-such-recipe"), 2, "no-such-recipe"),
    Case("build", "a recipe that is not TOML", ("build", "{w}/r.toml"), 2, "not valid TOML",
         write("r.toml", "[model\nname=")),
    Case("build", "a recipe that is binary", ("build", "{w}/r.toml"), 2, "r.toml",
         write("r.toml", b"\xff\xfe\x00\x01")),
    Case("build", "a recipe that is a named pipe", ("build", "{w}/r.toml"), 2,
         "not a regular file", fifo("r.toml"), seconds=10),
    Case("build", "an empty -Q", ("build", "tiny-demo", "-Q", ""), 2, "no quantization type"),
    Case("build", "a Unicode recipe name", ("build", "{w}/u.toml", "--files-only"), 2, "name",
         recipe_with("u.toml", 'name = "tiny-demo"', 'name = "démo∑"')),
    # --- recipes, problems, imatrix, report, kld, bench ----------------------------------
    Case("recipes", "show a missing recipe", ("recipes", "show", "{w}/none.toml"), 2,
         "none.toml"),
    Case("problems", "a suite file of garbage", ("problems", "show", "{w}/s.jsonl"), 2,
         "s.jsonl", write("s.jsonl", "{]\n")),
    Case("problems", "a suite with a problem that is a number",
         ("problems", "show", "{w}/s.jsonl"), 2, "s.jsonl", write("s.jsonl", "5\n")),
    Case("imatrix", "a truncated model", ("imatrix", "{w}/t.gguf", "--out", "{w}/m.gguf"), 1,
         "cut short", truncated("bf16", "t.gguf", 64)),
    Case("imatrix", "an empty calibration text",
         ("imatrix", G, "--calibration", "{w}/c.txt", "--out", "{w}/m.gguf"), 2, "c.txt",
         write("c.txt", "")),
    Case("report", "an unknown recipe", ("report", "no-such-recipe"), 2, "no-such-recipe"),
    Case("kld", "a variant never built", ("kld", "tiny-demo", "-Q", "Q2_K"), 1, "Q2_K"),
    Case("bench", "a variant never built", ("bench", "tiny-demo", "-Q", "Q2_K"), 1, "Q2_K"),
]


def _checkpoint(w: World, cut: int = 0, header: bytes | None = None,
                config: bytes | None = None, tokenizer: bytes | None = None) -> None:
    """A copy of the demo checkpoint in ``w/ck`` with one file damaged."""
    import shutil

    src = Path(__file__).resolve().parents[2] / "models" / "tiny-demo"
    dest = w.root / "ck"
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    if cut:
        weights.write_bytes(weights.read_bytes()[:cut])
    if header is not None:
        weights.write_bytes(header)
    if config is not None:
        (dest / "config.json").write_bytes(config)
    if tokenizer is not None:
        (dest / "tokenizer.json").write_bytes(tokenizer)


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.name}" for c in CASES])
def test_hostile_input(case: Case, world: World, monkeypatch: pytest.MonkeyPatch):
    values = world.values()
    if world.simulated:
        warnings.warn(f"no mount permission here: {', '.join(world.simulated)} simulated "
                      "by failing OS calls (CI, as root, mounts real ones)", stacklevel=1)
    if case.setup is not None:
        case.setup(world)
    world.simulate(monkeypatch)
    if case.denied:  # root ignores permission bits, so no chmod can make this real
        (world.root / case.denied).mkdir(exist_ok=True)
        simulate_os_error(monkeypatch, world.root / case.denied, EACCES)
    if case.unreadable:
        simulate_os_error(monkeypatch, world.root / case.unreadable, EACCES, reads=True)
    for key, value in case.env:
        monkeypatch.setenv(key, _fill(value, values))
    for target, value in case.patch:
        monkeypatch.setattr(target, value)
    args = [_fill(a, values) for a in case.args]
    before = snapshot(world.root)
    started = time.monotonic()
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    took = time.monotonic() - started
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail("crashed:\n" + "".join(traceback.format_exception(result.exception)))
    assert "Traceback" not in output, output
    assert result.exit_code == case.code, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    if case.code:
        assert len(errors) == 1, output
        # the problem is named in the Error line, or (modelfile --check) in the
        # FILE:LINE: PROBLEM lines the Error line sums up
        assert _fill(case.says, values) in output, output
        if "Usage:" not in output:  # a MathqError: the fix follows in parentheses
            assert errors[0].endswith(")") and " (" in errors[0], errors[0]
    else:
        assert not errors, output
    if case.seconds is not None:
        assert took <= case.seconds, f"took {took:.1f} s, limit {case.seconds} s"
    after = snapshot(world.root)
    for rel in case.writes:  # a name ending in / stands for everything under it
        for snap in (before, after):
            for key in [k for k in snap if k == rel or k == rel.rstrip("/")
                        or (rel.endswith("/") and k.startswith(rel))]:
                snap.pop(key)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (added, removed, changed) == ([], [], []), "left behind / removed / changed"


def test_the_readme_table_counts_this_table():
    """The README's Reliability table is this table's count by command, and its total."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, int] = {}
    for names, n in re.findall(r"\| ((?:`\w+`(?:, )?)+) \| (\d+)(?: each)? \|", section):
        for name in re.findall(r"`(\w+)`", names):
            documented[name] = int(n)
    assert documented == dict(Counter(c.command for c in CASES))
    assert f"{len(CASES)} cases, all passing" in section
