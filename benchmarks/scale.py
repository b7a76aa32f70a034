"""A 7B at full shape: every mathq stage beside its llama.cpp peer, wall time, peak RSS and disk.

Writes a DeepSeek-Math-7B-shaped Hugging Face checkpoint (30 layers, hidden 4096, FFN 11008,
32 heads, vocabulary 102400, DeepSeek's real tokenizer files, BF16 in two safetensors shards
with an index, seeded random weights: about 13.8 GB), streaming, so writing it needs little
RAM. Then runs each stage and its peer on the same files, one after the other:

    stage      mathq                                   peer
    convert    mathq convert                           convert_hf_to_gguf.py --outtype bf16; cp
    quantize   mathq quantize Q8_0, Q4_K_M, Q2_K       llama-quantize (outputs compared bytewise)
    imatrix    mathq imatrix, 4 chunks of 512          llama-imatrix, the same text
    kld        mathq kld Q4_K_M, 4 chunks of 512       llama-perplexity --kl-divergence (2 runs)
    bench      mathq bench Q4_K_M pp64 tg16            llama-bench -p 64 -n 16
    smoke      mathq smoke Q4_K_M, 8 problems x 32     llama-server -np 8, driven by mathq smoke
    build      mathq build of the above, then a rerun  (the rerun must redo nothing)
    tune       mathq tune --match Q4_K_M in the build's  mathq quantize -Q Q4_K_M of the same
               folder (its stock file and held-out      BF16 file (the goal: the tune at most
               reference pass reused)                   4x that)

Each command is measured for wall time, the peak resident memory of its whole process tree
(the largest of: the tree's summed RSS, sampled every 50 ms, and any one process's VmHWM)
and the disk it used at its high-water mark (the file system's free space, sampled); its
inputs are read into the page cache first, so mathq and its peer both start warm. Results
go to ``<work>/scale.json`` after every command: a rerun keeps what was measured and goes on
(``--redo STAGE`` measures one again). A peer that cannot be built or run here (no network
for the sdist or torch, a tool that fails to build) is reported as such, never guessed.

    .venv/bin/python benchmarks/scale.py                  # the 7B shape, ~14 GB in .bench/scale
    .venv/bin/python benchmarks/scale.py --layers 2       # the same widths, 2 layers: a check
    .venv/bin/python benchmarks/scale.py --tiny --no-peers --work /tmp/s   # seconds (CI)

Needs about 60 GB free at full shape (checkpoint, BF16 twice, the variants, the build); where
the disk holds one set of files only, the stages' files are removed before the build stage.
On a 2-core machine the stages take about 40 minutes and the build stage 1 h 45 min (its
bench and KLD steps run at their defaults: pp512 x 5 per variant, the whole KLD corpus).
Not run by CI at full shape; ``tests/test_scale_benchmark.py`` runs ``--tiny --no-peers``
(the build stage then stops at the files: ``--files-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tinymodel import TinySpec, build_checkpoint  # noqa: E402

from benchmarks.quantize import sha256  # noqa: E402

#: DeepSeek-Math 7B's shape (its config.json).
FULL = TinySpec(n_layer=30, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=102400,
                n_ctx=4096, shards=2)
#: A shape CI runs in seconds: the real vocabulary (the tokenizer needs it), tiny widths.
TINY = TinySpec(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=102400,
                n_ctx=4096, shards=2)
QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")
MODEL = "scale"
CHUNKS, CTX = 4, 512
SMOKE_N, SMOKE_TOKENS, SMOKE_P = 8, 32, 8
PROBLEMS = ROOT / "tests" / "fixtures" / "math500" / "test.jsonl"
CALIBRATION = ROOT / "models" / "tiny-demo" / "problems.jsonl"


@dataclass
class Measured:
    """One command's cost."""

    seconds: float
    peak_rss_bytes: int
    disk_bytes: int
    exit_code: int
    #: user + system CPU time of the process and the children it waited for: steadier than
    #: wall time on a shared VM (single runs of one quantize vary by 15 % in wall time)
    cpu_seconds: float = 0.0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(argv: list[str], log: Path, disk: Path, env: dict[str, str] | None = None
            ) -> Measured:
    """Run ``argv`` (output to ``log``) and sample its process tree's memory and the disk."""
    free0 = shutil.disk_usage(disk).free
    peak = [0, free0]
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                pids = _tree(proc.pid)
                rss = sum(_status_kib(p, "VmRSS") for p in pids) * 1024
                hwm = max((_status_kib(p, "VmHWM") for p in pids), default=0) * 1024
                peak[0] = max(peak[0], rss, hwm)
                peak[1] = min(peak[1], shutil.disk_usage(disk).free)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            raise
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - started
    return Measured(round(seconds, 2), peak[0], max(0, free0 - peak[1]), code,
                    round(usage.ru_utime + usage.ru_stime, 2))


def _read_through(path: Path) -> None:
    """Read a file (every file of a folder) into the page cache."""
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        with open(f, "rb") as src:
            while src.read(64 << 20):
                pass


class Results:
    """``scale.json``: what was measured, kept across runs, written after every command."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, object]] = (
            json.loads(path.read_text()) if path.is_file() else {})

    def has(self, key: str) -> bool:
        return key in self.data

    def put(self, key: str, value: dict[str, object]) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


class Run:
    """The benchmark's folders, shape and settings, and how it runs a command."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.work: Path = args.work.resolve()
        self.tiny: bool = args.tiny
        self.spec = TINY if args.tiny else (FULL if args.layers is None
                                            else TinySpec(**{**asdict(FULL),
                                                             "n_layer": args.layers}))
        self.threads: int = args.threads
        self.peers: bool = not args.no_peers
        self.results = Results(self.work / "scale.json")
        self.redo: set[str] = set(args.redo or ())
        self.hf = self.work / "hf"
        self.build = self.work / "build"
        self.recipe = self.work / f"{MODEL}.toml"
        self.text = self.work / "calibration.txt"
        self.logs = self.work / "logs"
        self.mathq = str(Path(sys.executable).parent / "mathq")
        self.planned_disk: int | None = None  # what `build --dry-run` says it will check for

    def gguf(self, quant: str) -> Path:
        return self.build / MODEL / f"{MODEL}-{quant}.gguf"

    def step(self, key: str, argv: list[str] | None, *, why_not: str | None = None,
             env: dict[str, str] | None = None, warm: tuple[Path, ...] = ()
             ) -> dict[str, object] | None:
        """Measure ``argv`` once (kept in scale.json); None (recorded with the reason) when
        it cannot run here. ``warm`` files are read first, unmeasured, so that mathq and its
        peer both start with their inputs in the page cache (whichever ran second found
        them there: 50.8 s against 34.2 s for the same Q8_0 quantize, cold against warm)."""
        step = key.split(":")[0]  # "quantize Q8_0": --redo quantize or --redo "quantize Q8_0"
        if self.results.has(key) and not {step, step.split()[0]} & self.redo:
            print(f"  {key}: kept from an earlier run", flush=True)
            return self.results.data[key]
        if argv is None:
            self.results.put(key, {"skipped": why_not})
            print(f"  {key}: skipped ({why_not})", flush=True)
            return None
        print(f"  {key}: {' '.join(Path(a).name if a.startswith('/') else a for a in argv)}",
              flush=True)
        for path in warm:
            _read_through(path)
        m = measure(argv, self.logs / f"{key.replace(':', '-')}.log", self.work, env)
        if m.exit_code != 0:
            raise SystemExit(f"{key} failed (exit {m.exit_code}); see "
                             f"{self.logs / (key.replace(':', '-') + '.log')}")
        value = {**asdict(m)}
        self.results.put(key, value)
        print(f"    {m.seconds:.1f} s, peak RSS {m.peak_rss_bytes / 2**30:.2f} GiB, disk "
              f"{m.disk_bytes / 2**30:.2f} GiB", flush=True)
        return value

    def peer(self, name: str) -> tuple[str | None, str | None]:
        """llama.cpp's ``name`` tool, or None and why it is not available."""
        if not self.peers:
            return None, "peers off (--no-peers)"
        from benchmarks.peers import tool

        try:
            return str(tool(name)), None
        except (subprocess.CalledProcessError, OSError) as e:
            return None, f"{name} could not be built from the pinned sdist ({e})"


# --- stages -----------------------------------------------------------------------------


def prepare(run: Run) -> None:
    """The checkpoint, the recipe and the calibration text (written once)."""
    run.logs.mkdir(parents=True, exist_ok=True)
    if not (run.hf / "model.safetensors.index.json").is_file():
        print(f"writing the checkpoint ({run.spec.n_layer} layers, hidden "
              f"{run.spec.n_embd}) into {run.hf} ...", flush=True)
        started = time.perf_counter()
        build_checkpoint(run.hf, run.spec, fast_random=True)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    from mathq.datasets.corpus import BUNDLED_CORPUS

    # The bundled notes are the KLD text; the matrix gets other text, none of it a smoke
    # problem (mathq refuses that): the demo's training-style word problems, as plain text.
    if not run.text.is_file():
        rows = [json.loads(line) for line in CALIBRATION.read_text().splitlines()]
        run.text.write_text("\n\n".join(f"{r['problem']}\n\n{r['solution']}" for r in rows))
    run.recipe.write_text(f"""# Written by benchmarks/scale.py: a 7B-shaped checkpoint.
[model]
name = "{MODEL}"
local_dir = "hf"
kind = "chat"
license_name = "MIT"
license_url = "https://opensource.org/license/mit"
pre_tokenizer = "deepseek-llm"

[prompt]
template = "deepseek-chat"

[quants]
variants = [{", ".join(f'"{q}"' for q in QUANTS)}]
default = "Q4_K_M"

[ollama]
model = "{MODEL}"

[ollama.tags]
{chr(10).join(f'{q.lower()} = "{q}"' for q in QUANTS)}

[smoke]
suite = "{PROBLEMS}"
n = {SMOKE_N}
max_tokens = {SMOKE_TOKENS}

[kld]
corpus = "{BUNDLED_CORPUS}"
""")


def convert(run: Run) -> None:
    run.step("convert:mathq", [run.mathq, "convert", str(run.recipe), "--build-dir",
                               str(run.build), "--quiet"], warm=(run.hf,))
    copy = run.work / "peer-cp"
    shutil.rmtree(copy, ignore_errors=True)
    run.step("convert:cp", ["cp", "-r", str(run.hf), str(copy)], warm=(run.hf,))
    shutil.rmtree(copy, ignore_errors=True)
    argv, why = None, "peers off (--no-peers)"
    if run.peers:
        try:
            from benchmarks.convert import upstream_python
            from benchmarks.peers import llama_cpp_source

            src = llama_cpp_source()
            python = upstream_python(run.work.parent / "upstream-venv", src)
            argv = [str(python), str(src / "convert_hf_to_gguf.py"), str(run.hf), "--outtype",
                    "bf16", "--outfile", str(run.work / "peer-BF16.gguf")]
        except (subprocess.CalledProcessError, OSError) as e:
            why = f"upstream converter unavailable here ({e})"
    run.step("convert:upstream", argv, why_not=why, warm=(run.hf,))
    (run.work / "peer-BF16.gguf").unlink(missing_ok=True)


def quantize(run: Run) -> None:
    tool, why = run.peer("llama-quantize")
    for q in QUANTS:
        run.step(f"quantize {q}:mathq", [run.mathq, "quantize", str(run.recipe), "-Q", q,
                                         "--threads", str(run.threads), "--build-dir",
                                         str(run.build), "--quiet"], warm=(run.gguf("BF16"),))
        out = run.work / f"peer-{q}.gguf"
        peer = run.step(f"quantize {q}:llama-quantize",
                        [tool, str(run.gguf("BF16")), str(out), q, str(run.threads)]
                        if tool else None, why_not=why, warm=(run.gguf("BF16"),))
        if peer is not None and out.is_file():
            peer["identical"] = sha256(out) == sha256(run.gguf(q))
            run.results.put(f"quantize {q}:llama-quantize", peer)
            out.unlink()


def imatrix(run: Run) -> None:
    tool, why = run.peer("llama-imatrix")
    run.step("imatrix:mathq", [run.mathq, "imatrix", str(run.recipe), "-c", str(run.text),
                               "--plain", "--chunks", str(CHUNKS), "--ctx", str(CTX),
                               "--threads", str(run.threads), "--build-dir", str(run.build),
                               "--force", "--quiet"], warm=(run.gguf("BF16"),))
    out = run.work / "peer.imatrix.gguf"
    run.step("imatrix:llama-imatrix",
             [tool, "-m", str(run.gguf("BF16")), "-f", str(run.text), "-o", str(out),
              "--ctx-size", str(CTX), "--chunks", str(CHUNKS), "--no-ppl", "-t",
              str(run.threads)] if tool else None, why_not=why, warm=(run.gguf("BF16"),))
    out.unlink(missing_ok=True)


def kld(run: Run) -> None:
    from mathq.datasets.corpus import BUNDLED_CORPUS

    tool, why = run.peer("llama-perplexity")
    run.step("kld:mathq", [run.mathq, "kld", str(run.recipe), "-Q", "Q4_K_M", "--chunks",
                           str(CHUNKS), "-c", str(CTX), "--threads", str(run.threads),
                           "--build-dir", str(run.build), "--quiet"],
             warm=(run.gguf("BF16"), run.gguf("Q4_K_M")))
    base = run.work / "peer-base.kld"
    common = ["-f", str(BUNDLED_CORPUS), "-c", str(CTX), "--chunks", str(CHUNKS), "-t",
              str(run.threads)]
    run.step("kld:llama-perplexity base",
             [tool, "-m", str(run.gguf("BF16")), *common, "--kl-divergence-base", str(base)]
             if tool else None, why_not=why, warm=(run.gguf("BF16"),))
    run.step("kld:llama-perplexity kld",
             [tool, "-m", str(run.gguf("Q4_K_M")), *common, "--kl-divergence-base", str(base),
              "--kl-divergence"] if tool else None, why_not=why, warm=(run.gguf("Q4_K_M"),))
    base.unlink(missing_ok=True)


def bench(run: Run) -> None:
    tool, why = run.peer("llama-bench")
    run.step("bench:mathq", [run.mathq, "bench", str(run.recipe), "-Q", "Q4_K_M", "-p", "64",
                             "-n", "16", "-r", "1", "--parallel", "", "--threads",
                             str(run.threads), "--build-dir", str(run.build), "--quiet"],
             warm=(run.gguf("Q4_K_M"),))
    run.step("bench:llama-bench", [tool, "-m", str(run.gguf("Q4_K_M")), "-p", "64", "-n", "16",
                                   "-r", "1", "-t", str(run.threads)] if tool else None,
             why_not=why, warm=(run.gguf("Q4_K_M"),))


def smoke(run: Run) -> None:
    common = [str(run.recipe), "-Q", "Q4_K_M", "--n", str(SMOKE_N), "--max-tokens",
              str(SMOKE_TOKENS), "-P", str(SMOKE_P), "--threads", str(run.threads), "--quiet"]
    run.step("smoke:mathq", [run.mathq, "smoke", *common, "--build-dir", str(run.build),
                             "--restart"], warm=(run.gguf("Q4_K_M"),))
    tool, why = run.peer("llama-server")
    if tool is None:
        run.step("smoke:llama-server", None, why_not=why)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = run.logs / "llama-server.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        server = subprocess.Popen([tool, "-m", str(run.gguf("Q4_K_M")), "-np", str(SMOKE_P),
                                   "-c", str(SMOKE_P * 1024), "-t", str(run.threads), "--host",
                                   "127.0.0.1", "--port", str(port), "--no-webui"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, server, log)
        start_seconds = round(time.perf_counter() - started, 2)
        peer = run.step("smoke:llama-server", [run.mathq, "smoke", *common, "--endpoint", url,
                                               "--out-dir", str(run.work / "peer-smoke"),
                                               "--restart"])
        if peer is not None and "server_peak_rss_bytes" not in peer:
            # The server runs the model: its own high-water mark is the peer's memory, and
            # its start (loading the model, as mathq smoke does inside its own run) is part
            # of the peer's time.
            server_peak = _status_kib(server.pid, "VmHWM") * 1024
            peer["server_peak_rss_bytes"] = server_peak
            peer["peak_rss_bytes"] = max(int(str(peer["peak_rss_bytes"])), server_peak)
            peer["server_start_seconds"] = start_seconds
            peer["seconds"] = round(float(str(peer["seconds"])) + start_seconds, 2)
            run.results.put("smoke:llama-server", peer)
    finally:
        server.terminate()
        server.wait(60)


def _wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"llama-server did not start; see {log}")


def build(run: Run) -> None:
    """The whole build, then the same command again (which must redo nothing). At tiny
    widths only the files are built (``--files-only``): CI checks the rerun, not the
    measurements, which the stages above already ran."""
    argv = [run.mathq, "build", str(run.recipe), "--quant", ",".join(QUANTS), "--n",
            str(SMOKE_N), "--build-dir", str(run.work / "build-all"), "--quiet", "--json",
            *(["--files-only"] if run.tiny else [])]
    if not run.results.has("build:mathq"):
        # exit status 1 with the plan on stdout: the dry run's own refusal of a full disk
        dry = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if dry.returncode not in (0, 1) or not dry.stdout.strip():
            raise SystemExit(f"build --dry-run failed: {dry.stderr.strip()}")
        run.planned_disk = sum(s.get("needs_bytes", 0) for s in json.loads(dry.stdout))
        if run.planned_disk > shutil.disk_usage(run.work).free and run.build.is_dir():
            # The stages' files are measured; at full shape the disk may hold one set only
            # (checkpoint 13.8 GB, then BF16 and three variants 28 GB per set).
            print(f"  removing the stages' files ({run.build}) to make room for the build",
                  flush=True)
            shutil.rmtree(run.build)
    built = run.step("build:mathq", argv, env={"HF_HUB_OFFLINE": "1"})
    if built is not None and "checked_bytes" not in built and run.planned_disk is not None:
        # the disk the build checked for up front, beside what it used at its high-water mark
        built["checked_bytes"] = run.planned_disk
        run.results.put("build:mathq", built)
    rerun = run.step("build:rerun", argv, env={"HF_HUB_OFFLINE": "1"})
    if rerun is not None and "redone" not in rerun:
        plan = json.loads((run.logs / "build-rerun.log").read_text())
        rerun["redone"] = [s["name"] for s in plan["steps"] if s["status"] != "skipped"]
        run.results.put("build:rerun", rerun)
        print(f"    redone on the rerun: {', '.join(rerun['redone']) or 'nothing'}")


def tune(run: Run) -> None:
    """``mathq tune --match Q4_K_M`` where the build stage left its files (the BF16 model,
    the stock Q4_K_M the budget is, the held-out reference pass), calibrated on text that is
    not the KLD text; and, in the same run, one plain ``mathq quantize -Q Q4_K_M`` of the
    same BF16 file into a scratch folder: the yardstick of the tune's goal. The tune's
    record (``*.tune.json``) says where its time went, phase by phase."""
    folder = run.work / "build-all"
    bf16 = folder / MODEL / f"{MODEL}-BF16.gguf"
    if not bf16.is_file():
        raise SystemExit(f"the tune stage needs the build stage's files ({bf16} is missing)")
    scratch = run.work / "tune-quantize"
    run.step("tune:quantize Q4_K_M", [run.mathq, "quantize", str(bf16), "-Q", "Q4_K_M",
                                      "--threads", str(run.threads), "--out-dir", str(scratch),
                                      "--quiet"], warm=(bf16,))
    shutil.rmtree(scratch, ignore_errors=True)
    tuned = run.step("tune:mathq", [run.mathq, "tune", str(run.recipe), "--match", "Q4_K_M",
                                    "-c", str(run.text), "--threads", str(run.threads),
                                    "--build-dir", str(folder), "--quiet"],
                     env={"HF_HUB_OFFLINE": "1"}, warm=(bf16,))
    record = folder / MODEL / f"{MODEL}-Q4_K_M-tuned.tune.json"
    if tuned is not None and "phase_seconds" not in tuned and record.is_file():
        r = json.loads(record.read_text())
        tuned.update({k: r[k] for k in ("phase_seconds", "kld", "kld_err", "predicted_kld",
                                        "size", "stock_size")})
        run.results.put("tune:mathq", tuned)
    if tuned is not None and "phase_seconds" in tuned:
        print("    " + ", ".join(f"{k} {v:.0f} s" for k, v in tuned["phase_seconds"].items()))


STAGES = {"convert": convert, "quantize": quantize, "imatrix": imatrix, "kld": kld,
          "bench": bench, "smoke": smoke, "build": build, "tune": tune}


def _cost(v: dict[str, object]) -> tuple[float, float, float]:
    """Seconds, peak RSS (GiB) and disk (GiB) of one measured command."""
    return (float(str(v["seconds"])), int(str(v["peak_rss_bytes"])) / 2**30,
            int(str(v["disk_bytes"])) / 2**30)


def _peer_seconds(data: dict[str, dict[str, object]], stage: str) -> float | None:
    """The peer's wall time for ``stage`` (both llama-perplexity runs for kld)."""
    keys = {"convert": ["convert:upstream"], "imatrix": ["imatrix:llama-imatrix"],
            "kld": ["kld:llama-perplexity base", "kld:llama-perplexity kld"],
            "bench": ["bench:llama-bench"], "smoke": ["smoke:llama-server"],
            "tune": ["tune:quantize Q4_K_M"]}.get(
        stage, [f"{stage}:llama-quantize"])
    runs = [data.get(k, {}) for k in keys]
    if not all("seconds" in r for r in runs):
        return None
    return sum(_cost(r)[0] for r in runs)


def table(data: dict[str, dict[str, object]]) -> str:
    """The README's table: each command's wall, peak RSS, disk, and mathq's ratio to the
    peer measured in the same run."""
    lines = ["| stage | command | wall | CPU | peak RSS | disk | vs peer |",
             "|---|---|---|---|---|---|---|"]
    for key, v in data.items():
        stage, who = key.split(":", 1)
        if "skipped" in v:
            lines.append(f"| {stage} | {who} | skipped: {v['skipped']} | | | | |")
            continue
        cpu = f"{float(str(v['cpu_seconds'])):.1f} s" if v.get("cpu_seconds") else ""
        seconds, rss, disk = _cost(v)
        peer = _peer_seconds(data, stage) if who == "mathq" else None
        ratio = f"{seconds / peer:.2f}x" if peer else ""
        same = " (byte-identical)" if v.get("identical") else ""
        if "checked_bytes" in v:
            same += f" (checked for {int(str(v['checked_bytes'])) / 2**30:.2f} GiB)"
        lines.append(f"| {stage} | {who}{same} | {seconds:.1f} s | {cpu} | {rss:.2f} GiB | "
                     f"{disk:.2f} GiB | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "scale")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, same widths")
    ap.add_argument("--tiny", action="store_true", help="tiny widths: a check in seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true", help="measure mathq only")
    ap.add_argument("--only", default=",".join(STAGES), help="stages, comma-separated")
    ap.add_argument("--redo", action="append", help="measure this stage again")
    args = ap.parse_args()
    run = Run(args)
    run.work.mkdir(parents=True, exist_ok=True)
    prepare(run)
    for name in args.only.split(","):
        print(f"{name}:", flush=True)
        STAGES[name](run)
    print(table(run.results.data))


if __name__ == "__main__":
    main()
