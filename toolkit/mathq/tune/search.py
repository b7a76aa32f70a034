"""``mathq tune``: the GGUF with the lowest measured KL divergence that fits a byte budget.

The search, in four phases (each reports progress, each is kept on disk so a killed run
resumes where it stopped):

1. **Costs.** Every quantizable tensor is quantized to every candidate type with ggml's own
   routines and back; its cost is the squared error weighted by the importance matrix (the
   mean squared activation of each input column: an error in a column the model drives hard
   matters more). Without ``--imatrix`` the file is quantized without one, but the costs are
   still weighted, by a matrix computed on the calibration text for this purpose only.
2. **Calibration.** Error is not KLD: how much a unit of error in ``ffn_down`` moves the
   output distribution differs from ``attn_k``. One real probe per tensor group (every layer's
   tensors of one role quantized to the probe type, the rest BF16, through llama.cpp's
   quantizer, then the KLD pass against BF16 on the calibration text) gives each group a
   factor from error to KLD. Probes are journalled one line each: a rerun keeps them.
3. **Allocation.** Predicted KLD is the sum of factor x error; :func:`mathq.tune.plan.allocate`
   spends the byte budget by predicted KLD saved per byte.
4. **Truth.** The chosen file is written by llama.cpp's quantizer with one override per tensor,
   and its KLD is measured on the calibration text (checking the prediction, together with
   the stock mix as a held-out probe) and on the held-out text (the number reported).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mathq.convert.gguf_info import GGUFSummary, read_gguf_header, read_gguf_summary
from mathq.datasets.corpus import Corpus, load_corpus
from mathq.datasets.problems import ProblemSet
from mathq.errors import MissingImatrixError, QuantizeError, TuneError
from mathq.evaluate.kld.measure import (
    KldOptions,
    ReferenceCache,
    ensure_reference_file,
    measure_gguf,
)
from mathq.evaluate.summaries import KldSummary
from mathq.fsutil import sha256_file, write_text_atomic
from mathq.inputs import UnreadableInput, parse_json
from mathq.layout import overrides_file
from mathq.manifest import file_identity
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.calibration import build_calibration_text, load_calibration, normalise
from mathq.quantize.core import QuantizeOptions, check_imatrix_fits, quantize_gguf
from mathq.quantize.imatrix import ImatrixOptions, compute_imatrix
from mathq.quantize.imatrix_file import Imatrix, load_imatrix
from mathq.recipes.prompt import PromptSpec
from mathq.recipes.quants import IMATRIX_SUFFIX, Variant, get_quant
from mathq.tune import ggml
from mathq.tune.costs import tensor_costs
from mathq.tune.plan import (
    DEFAULT_TYPES,
    FTYPE_OF_TYPE,
    SizeModel,
    TensorCost,
    allocate,
    candidates,
    check_budget,
    group_of,
    main_type,
    overrides_pairs,
    overrides_text,
    predicted,
    quantizable,
    size_model,
    tensor_bytes,
)

PROBE_BASE = "Q8_0"   # the probe files' nominal file type; every tensor is overridden
CHARS_PER_TOKEN_BOUND = 8


@dataclass(frozen=True)
class Budget:
    """The size limit: ``--match QUANT`` (the stock file's size), ``--size`` bytes or
    ``--bpw`` bits per weight of the BF16 model's weights."""

    match: str | None = None
    size: int | None = None
    bpw: float | None = None


@dataclass(frozen=True)
class TuneOptions:
    """How to tune: budget, importance matrix, candidate types, calibration and held-out
    text. ``calibration`` is a source as ``mathq imatrix --calibration`` takes it; the
    probes read ``probe_chunks`` chunks of it. ``kld`` is how the held-out text is measured
    (the same options as ``mathq kld``, so a build shares the reference pass)."""

    budget: Budget
    imatrix: Path | None = None
    types: tuple[str, ...] = DEFAULT_TYPES
    calibration: str = "math-train"
    probe_chunks: int = 8
    kld: KldOptions = field(default_factory=KldOptions)
    seed: int = 0
    threads: int = 0


@dataclass(frozen=True)
class TuneJob:
    """Files: the BF16 model, the outputs, the work folder (costs, probe journal, the
    calibration reference), where the held-out reference pass is cached, the smoke problems
    the calibration text must avoid, the prompt format, and a stock file to reuse for
    ``--match`` (a build's own) when it exists."""

    source: Path
    name: str
    dest: Path
    work_dir: Path
    heldout_cache: Path
    smoke: Callable[[], ProblemSet]
    prompt: PromptSpec | None = None
    stock: Path | None = None

    @property
    def overrides_path(self) -> Path:
        """``<model>-<NAME>.overrides.txt`` beside the GGUF."""
        return overrides_file(self.dest)

    @property
    def record_path(self) -> Path:
        """``<model>-<NAME>.tune.json``: the search's record."""
        return self.dest.with_name(self.dest.name.removesuffix(".gguf") + ".tune.json")


@dataclass(frozen=True)
class Probe:
    """One measured configuration: what it was, predicted and measured KLD on the
    calibration text, and whether this run measured it or found it in the journal."""

    label: str
    predicted_kld: float | None
    kld: float
    kld_err: float
    reused: bool


@dataclass(frozen=True)
class TuneResult:
    """The tuned file and the evidence beside it."""

    path: Path
    overrides: Path
    record: Path
    name: str
    budget: int
    size: int
    predicted_kld: float
    calibration_kld: float
    kld: KldSummary
    stock_size: int | None
    probes: tuple[Probe, ...]
    checks: tuple[Probe, ...]
    types: dict[str, str]
    seconds: float


def tune_name(budget: Budget, imatrix: bool, bpw: float | None = None) -> str:
    """``Q4_K_M-tuned`` (``Q4_K_M-imat-tuned``) for ``--match``, else ``T<bpw>``
    (``T4.85-imat``): names no stock mix has."""
    if budget.match:
        return Variant(get_quant(budget.match), imatrix, tuned=True).name
    return f"T{bpw:.2f}{IMATRIX_SUFFIX if imatrix else ''}"


class _Journal:
    """Measured probes, one JSON line each, appended and fsynced as each finishes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = parse_json(line)
                    self.done[row["key"]] = row
                except (UnreadableInput, KeyError, TypeError):
                    continue  # a line cut short by a kill: that probe is measured again

    def add(self, row: dict) -> None:
        self.done[row["key"]] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _check_disjoint(text: str, heldout: Corpus, source: str) -> None:
    """The calibration text must not hold any passage of the held-out text."""
    flat = normalise(text)
    for para in heldout.text.split("\n\n"):
        p = normalise(para)
        if len(p) >= 80 and p in flat:
            raise TuneError(f"the calibration text {source} contains held-out text of "
                            f"{heldout.name} ({p[:40]!r}...)",
                            "calibrate on text kept apart from the [kld] corpus")


def calibration_corpus(job: TuneJob, options: TuneOptions, heldout: Corpus,
                       progress: ProgressCallback = no_progress) -> Corpus:
    """The probes' text: the calibration source without smoke problems and without
    problems that appear in the held-out text, cut to what ``probe_chunks`` read."""
    loaded, source = load_calibration(options.calibration, progress)
    if not isinstance(loaded, str):
        flat = normalise(heldout.text)
        loaded = [p for p in loaded if normalise(p.problem) not in flat]
    limit = options.probe_chunks * options.kld.n_ctx * CHARS_PER_TOKEN_BOUND
    text = build_calibration_text(options.calibration, job.smoke(), spec=job.prompt,
                                  max_chars=limit, seed=options.seed, progress=progress,
                                  preloaded=(loaded, source))
    _check_disjoint(text.text, heldout, source)
    return Corpus(f"calibration: {source}", text.text,
                  hashlib.sha256(text.text.encode()).hexdigest())


def _cost_imatrix(job: TuneJob, options: TuneOptions, calib: Corpus,
                  progress: ProgressCallback) -> Imatrix:
    """The matrix that weights the costs: the one given, else one computed on the
    calibration text (used for the costs only, never given to the quantizer)."""
    if options.imatrix is not None:
        return load_imatrix(options.imatrix)
    dest = job.work_dir / f"cost-{calib.sha256[:12]}.imatrix.gguf"
    if not dest.is_file():
        compute_imatrix(job.source, calib.text, dest,
                        ImatrixOptions(n_ctx=options.kld.n_ctx, chunks=options.probe_chunks,
                                       process_output=True, threads=options.threads,
                                       gpu_layers=options.kld.gpu_layers),
                        calib.name, progress)
    return load_imatrix(dest)


def _metadata(options: TuneOptions, budget: int, overrides_sha: str,
              predicted_kld: float, calib: Corpus) -> tuple[tuple[str, str | int], ...]:
    from mathq import __version__

    b = options.budget
    what = (f"match {get_quant(b.match).name}" if b.match else
            f"size {b.size}" if b.size is not None else f"bpw {b.bpw}")
    return (("quantize.tuned.by", f"mathq tune {__version__}"),
            ("quantize.tuned.budget", f"{what}: {budget} bytes"),
            ("quantize.tuned.types", ",".join(options.types)),
            ("quantize.tuned.calibration", calib.name),
            ("quantize.tuned.predicted_kld", f"{predicted_kld:.6f}"),
            ("quantize.tuned.overrides_sha256", overrides_sha))


def _extra_metadata_bytes() -> int:
    """Bytes the tuned keys add to a header, at most (each: key, type, string length)."""
    return 6 * (8 + 32 + 4 + 8 + 127)


class _Prober:
    """Quantize a configuration and measure its KLD on the calibration text, once."""

    def __init__(self, job: TuneJob, options: TuneOptions, ref: ReferenceCache,
                 calib: Corpus, progress: ProgressCallback) -> None:
        self.job, self.options, self.ref, self.calib = job, options, ref, calib
        self.progress = progress
        self.journal = _Journal(job.work_dir / "probes.jsonl")
        self.imatrix_sha = sha256_file(options.imatrix) if options.imatrix else None

    def key(self, assignment: Mapping[str, str]) -> str:
        material = {"source": file_identity(self.job.source), "reference": self.ref.key,
                    "imatrix": self.imatrix_sha, "types": dict(sorted(assignment.items()))}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]

    def measure(self, label: str, assignment: Mapping[str, str],
                prediction: float | None) -> Probe:
        key = self.key(assignment)
        row = self.journal.done.get(key)
        if row is not None:
            return Probe(label, prediction, row["kld"], row["kld_err"], reused=True)
        started = time.perf_counter()
        path = self.job.work_dir / f"probe-{key}.gguf"
        try:
            quantize_gguf(self.job.source, path,
                          QuantizeOptions(get_quant(PROBE_BASE), imatrix=self.options.imatrix,
                                          overrides=overrides_pairs(assignment),
                                          threads=self.options.threads))
            summary = measure_gguf(path, label, self.job.name, self.ref, self.calib,
                                   self.options.kld, self.progress)
        finally:
            path.unlink(missing_ok=True)
        self.journal.add({"key": key, "label": label, "kld": summary.mean_kld,
                          "kld_err": summary.mean_kld_err,
                          "seconds": round(time.perf_counter() - started, 3)})
        return Probe(label, prediction, summary.mean_kld, summary.mean_kld_err, reused=False)


def preflight(source: Path, options: TuneOptions) -> tuple[GGUFSummary, Imatrix | None]:
    """Every check that needs no model run: input, types, importance matrix."""
    from gguf import GGMLQuantizationType

    model = read_gguf_summary(source)
    if model.is_quantized:
        raise TuneError(f"{source.name} is already quantized ({model.file_type_name})",
                        "tune from the BF16 GGUF")
    imatrix = load_imatrix(options.imatrix) if options.imatrix else None
    if imatrix is not None:
        check_imatrix_fits(imatrix, model)
    for ty in options.types:
        if imatrix is None and ggml.requires_imatrix(int(GGMLQuantizationType[ty])):
            raise MissingImatrixError(f"--types {ty} needs an importance matrix",
                                      "pass --imatrix FILE, or leave it out of --types")
    return model, imatrix


def budget_bytes(options: TuneOptions, model: GGUFSummary, stock_size: int | None) -> int:
    """The budget in bytes (``--bpw`` counts every weight of the model, as the report's
    bits-per-weight column does)."""
    b = options.budget
    if b.match:
        assert stock_size is not None
        return stock_size
    if b.size is not None:
        return b.size
    assert b.bpw is not None
    return int(b.bpw * model.n_params / 8)


def run_tune(job: TuneJob, options: TuneOptions,
             progress: ProgressCallback = no_progress) -> TuneResult:
    """Search, write and measure the tuned file; record the search beside it."""
    started = time.perf_counter()
    model, imatrix = preflight(job.source, options)
    header = read_gguf_header(job.source)
    sizes: SizeModel = size_model(model, header.data_offset, _extra_metadata_bytes())
    shapes = [TensorCost(t.name, group_of(t.name),
                         {ty: tensor_bytes(t, ty) for ty in candidates(t, options.types)},
                         {}) for t in quantizable(model)]
    if options.budget.match is None:  # refuse an impossible budget before any work
        check_budget(budget_bytes(options, model, None), shapes, sizes, _what(options))
    heldout = load_corpus(options.kld.corpus)
    calib = calibration_corpus(job, options, heldout, progress)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    stock = _stock(job, options, progress)
    budget = budget_bytes(options, model, stock.size if stock else None)
    check_budget(budget, shapes, sizes, _what(options))

    calib_opts = replace(options.kld, max_chunks=options.probe_chunks)
    ref = ensure_reference_file(job.source, "BF16", job.work_dir, calib, calib_opts, progress)
    cost_matrix = _cost_imatrix(job, options, calib, progress)
    costs = tensor_costs(job.source, model, options.types, imatrix, cost_matrix,
                         job.work_dir / "costs.json", options.threads, progress)
    prober = _Prober(job, replace(options, kld=calib_opts), ref, calib, progress)

    probe_type = _probe_type(options.types)
    groups = sorted({c.group for c in costs})
    probes, sensitivity = [], {}
    for i, g in enumerate(groups):
        members = [c for c in costs if c.group == g]
        assignment = {c.name: ("BF16" if c.group != g else
                               probe_type if probe_type in c.n_bytes else min(
                                   c.n_bytes, key=lambda t, c=c: c.n_bytes[t]))
                      for c in costs}
        progress(Progress("tune probes", i, len(groups), "probes", item=g))
        probe = prober.measure(f"probe {g}", assignment, None)
        probes.append(probe)
        error = sum(c.error[assignment[c.name]] for c in members)
        sensitivity[g] = max(probe.kld, 1e-9) / max(error, 1e-30)
        progress(Progress("tune probes", i + 1, len(groups), "probes", item=g,
                          info=f"KLD {probe.kld:.5f}"))

    plan = allocate(costs, sensitivity, budget, sizes)
    plan_kld = predicted(costs, sensitivity, plan)
    progress(Progress("tune search", sizes.file_bytes(costs, plan), budget, "bytes",
                      info=f"predicted KLD {plan_kld:.5f}"))
    checks = []
    if stock is not None:
        written_types = stock.tensor_types()
        stock_types = {c.name: written_types[c.name] for c in costs}
        if all(stock_types[c.name] in c.error for c in costs):
            checks.append(prober.measure(f"stock {stock.file_type_name}", stock_types,
                                         predicted(costs, sensitivity, stock_types)))
    checks.append(prober.measure("tuned", plan, plan_kld))

    text = overrides_text(plan)
    overrides_sha = hashlib.sha256(text.encode()).hexdigest()
    ftype = get_quant(options.budget.match) if options.budget.match else \
        get_quant(FTYPE_OF_TYPE[main_type(costs, plan)])
    result = quantize_gguf(job.source, job.dest, QuantizeOptions(
        ftype, imatrix=options.imatrix, overrides=overrides_pairs(plan),
        threads=options.threads,
        metadata=_metadata(options, budget, overrides_sha, plan_kld, calib)), progress)
    written = {n: result.tensor_types[n] for n in plan}
    if written != plan or result.size > budget:
        job.dest.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp wrote {job.dest.name} with "
                            f"{'other types than planned' if written != plan else 'more bytes'}"
                            f" ({result.size} bytes, budget {budget})",
                            "this is a bug; please report it")
    write_text_atomic(job.overrides_path, text)
    heldout_ref = ensure_reference_file(job.source, "BF16", job.heldout_cache, heldout,
                                        options.kld, progress)
    summary = measure_gguf(job.dest, job.name, job.source.name, heldout_ref, heldout,
                           options.kld, progress)
    out = TuneResult(path=job.dest, overrides=job.overrides_path, record=job.record_path,
                     name=job.name, budget=budget, size=result.size, predicted_kld=plan_kld,
                     calibration_kld=checks[-1].kld, kld=summary,
                     stock_size=stock.size if stock else None, probes=tuple(probes),
                     checks=tuple(checks), types=plan,
                     seconds=round(time.perf_counter() - started, 3))
    _write_record(out, options, sensitivity, calib)
    return out


def _what(options: TuneOptions) -> str:
    b = options.budget
    return (f"the budget --match {b.match}" if b.match else
            f"the budget --size {b.size}" if b.size is not None else f"the budget --bpw {b.bpw}")


def _probe_type(types: tuple[str, ...]) -> str:
    """The type the probes quantize a group to: the second smallest candidate (the middle
    of the range the budgets of interest use), or the only one."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bpw(t: str) -> float:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
        return size * 8 / block

    ordered = sorted(types, key=lambda t: (bpw(t), t))
    return ordered[1] if len(ordered) > 1 else ordered[0]


def _stock(job: TuneJob, options: TuneOptions,
           progress: ProgressCallback) -> GGUFSummary | None:
    """The stock file of ``--match``: the build's own when it exists, else made once in the
    work folder (with the tune's importance matrix, the fair comparison)."""
    if not options.budget.match:
        return None
    if job.stock is not None and job.stock.is_file():
        return read_gguf_summary(job.stock)
    quant = get_quant(options.budget.match)
    path = job.work_dir / f"stock-{Variant(quant, options.imatrix is not None).name}.gguf"
    if not path.is_file():
        quantize_gguf(job.source, path, QuantizeOptions(quant, imatrix=options.imatrix,
                                                        threads=options.threads), progress)
    return read_gguf_summary(path)


def _write_record(result: TuneResult, options: TuneOptions, sensitivity: dict[str, float],
                  calib: Corpus) -> None:
    record = {
        "name": result.name, "file": result.path.name, "overrides": result.overrides.name,
        "budget": asdict(options.budget), "budget_bytes": result.budget, "size": result.size,
        "stock_size": result.stock_size, "types": list(options.types),
        "imatrix": str(options.imatrix) if options.imatrix else None,
        "calibration": calib.name, "calibration_sha256": calib.sha256,
        "predicted_kld": result.predicted_kld, "calibration_kld": result.calibration_kld,
        "kld": result.kld.mean_kld, "kld_err": result.kld.mean_kld_err,
        "heldout": result.kld.corpus, "sensitivity": sensitivity,
        "probes": [asdict(p) for p in result.probes], "checks": [asdict(p) for p in result.checks],
        "tensor_types": result.types, "seconds": result.seconds}
    write_text_atomic(result.record, json.dumps(record, indent=2, sort_keys=True) + "\n")
