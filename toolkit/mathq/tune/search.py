"""``mathq tune``: the GGUF with the lowest measured KL divergence that fits a byte budget.

The search, in four phases (each reports progress, each is kept on disk so a killed run
resumes where it stopped):

1. **Costs.** Every quantizable tensor is quantized to every candidate type with ggml's own
   routines and back; its cost is the squared error weighted by the importance matrix (the
   mean squared activation of each input column: an error in a column the model drives hard
   matters more). Without ``--imatrix`` the file is quantized without one, but the costs are
   still weighted, by a matrix computed on the calibration text for this purpose only.
2. **Calibration.** Error is not KLD: how much a unit of error in ``ffn_down`` moves the
   output distribution differs from ``attn_k``. One probe per tensor group (some of the
   group's layers quantized, the rest BF16: :mod:`mathq.tune.probes`)
   gives each group a factor from error to KLD.
3. **Allocation.** Predicted KLD is the sum of factor x error; :func:`mathq.tune.plan.allocate`
   spends the byte budget by predicted KLD saved per byte.
4. **Truth.** The chosen file is written by llama.cpp's quantizer with one override per tensor,
   and its KLD from BF16 is measured on the held-out text: the number reported, beside the
   prediction it checks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mathq.convert.gguf_info import GGUFSummary, read_gguf_header, read_gguf_summary
from mathq.datasets.corpus import Corpus, load_corpus
from mathq.datasets.problems import ProblemSet
from mathq.errors import MissingImatrixError, OutputBusyError, QuantizeError, TuneError
from mathq.evaluate.kld.measure import (
    KldOptions,
    ReferenceCache,
    ensure_reference_file,
    measure_gguf,
)
from mathq.evaluate.summaries import KldSummary
from mathq.fsutil import exclusive_lock, make_dirs, removing_new_dirs, write_text_atomic
from mathq.layout import overrides_file
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.calibration import (
    DEFAULT_CALIBRATION,
    build_calibration_text,
    load_calibration,
    normalise,
)
from mathq.quantize.core import QuantizeOptions, check_imatrix_fits, quantize_gguf
from mathq.quantize.imatrix import ImatrixOptions, compute_imatrix
from mathq.quantize.imatrix_file import Imatrix, load_imatrix
from mathq.recipes.prompt import PromptSpec
from mathq.recipes.quants import (
    FILE_TYPE_OF_TENSOR_TYPE,
    Variant,
    get_quant,
    tensor_type_bpw,
)
from mathq.tune import ggml
from mathq.tune.costs import tensor_costs
from mathq.tune.plan import (
    DEFAULT_TYPES,
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
from mathq.tune.probes import Probe, ProbeInputs, Prober, shards_for

CHARS_PER_TOKEN_BOUND = 8


@dataclass(frozen=True)
class Budget:
    """The size limit: ``--match QUANT`` (the stock file's size), ``--size`` bytes or
    ``--bpw`` bits per weight of the BF16 model's weights. Exactly one is set; these
    methods are the only place that reads which."""

    match: str | None = None
    size: int | None = None
    bpw: float | None = None

    def option(self) -> str:
        """As given on the command line: ``--match Q4_K_M``, ``--size 123``, ``--bpw 4.85``."""
        return (f"--match {self.match}" if self.match else
                f"--size {self.size}" if self.size is not None else f"--bpw {self.bpw}")

    def bits_per_weight(self, n_params: int) -> float | None:
        """The budget in bits per weight of a model of ``n_params`` weights; None for
        ``--match`` (the stock file's size is known only once it exists)."""
        if self.match:
            return None
        return self.bpw if self.bpw is not None else (self.size or 0) * 8 / max(n_params, 1)

    def bytes(self, n_params: int, stock_size: int | None) -> int:
        """The budget in bytes (``--bpw`` counts every weight of the model, as the report's
        bits-per-weight column does; ``--match`` is the stock file's size)."""
        if self.match:
            if stock_size is None:
                raise ValueError("a --match budget needs the stock file's size")
            return stock_size
        if self.size is not None:
            return self.size
        assert self.bpw is not None
        return int(self.bpw * n_params / 8)

    def variant(self, imatrix: bool, n_params: int) -> Variant:
        """``Q4_K_M-tuned`` (``Q4_K_M-imat-tuned``) for ``--match``, else ``T<bpw>``
        (``T4.85-imat``): names no stock mix has."""
        if self.match:
            return Variant(get_quant(self.match), imatrix, tuned=True)
        bpw = self.bits_per_weight(n_params)
        assert bpw is not None
        return Variant.budget(bpw, imatrix)

    @classmethod
    def of(cls, variant: Variant) -> Budget:
        """The budget a tuned variant is made to: its stock type's size, or its bits."""
        if variant.bpw is not None:
            return cls(bpw=variant.bpw)
        return cls(match=variant.quant.name)


@dataclass(frozen=True)
class TuneOptions:
    """How to tune: budget, importance matrix, candidate types, calibration and held-out
    text. ``calibration`` is a source as ``mathq imatrix --calibration`` takes it; the
    probes read ``probe_chunks`` chunks of it. ``kld`` is how the held-out text is measured
    (the same options as ``mathq kld``, so a build shares the reference pass).
    ``types`` and ``calibration`` None are the recipe's ``[tune]`` choices, else the
    defaults (:meth:`with_defaults`)."""

    budget: Budget
    imatrix: Path | None = None
    types: tuple[str, ...] | None = None
    calibration: str | None = None
    probe_chunks: int = 2
    kld: KldOptions = field(default_factory=KldOptions)
    seed: int = 0
    threads: int = 0


    def with_defaults(self, calibration: str | None = None,
                      types: tuple[str, ...] | None = None) -> TuneOptions:
        """These options with what they leave open filled: from ``calibration`` and
        ``types`` (a recipe's ``[tune]``), else the tuner's defaults."""
        return replace(self, calibration=self.calibration or calibration or DEFAULT_CALIBRATION,
                       types=self.types or types or DEFAULT_TYPES)


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
class TuneResult:
    """The tuned file and the evidence beside it."""

    path: Path
    overrides: Path
    record: Path
    name: str
    budget: int
    size: int
    predicted_kld: float
    kld: KldSummary
    stock_size: int | None
    probes: tuple[Probe, ...]
    types: dict[str, str]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)


class _PhaseClock:
    """Wall seconds per phase of a run, for the record: where a tune's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(time.perf_counter() - started, 3)


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
                  hashlib.sha256(text.text.encode()).hexdigest(), option="--calibration")


def _metadata(options: TuneOptions, budget: int, overrides_sha: str,
              predicted_kld: float, calibration: str) -> tuple[tuple[str, str | int], ...]:
    from mathq import __version__

    return (("quantize.tuned.by", f"mathq tune {__version__}"),
            ("quantize.tuned.budget", f"{options.budget.option()[2:]}: {budget} bytes"),
            ("quantize.tuned.types", ",".join(options.types)),
            ("quantize.tuned.calibration", calibration),
            ("quantize.tuned.predicted_kld", f"{predicted_kld:.6f}"),
            ("quantize.tuned.overrides_sha256", overrides_sha))


def _metadata_bound(options: TuneOptions) -> int:
    """Bytes the keys of :func:`_metadata` add to a header, at most: each key's own bytes
    and a value at its widest (a string is cut at 127 bytes, llama.cpp's override limit;
    :func:`mathq.quantize.core._kv_override`). Counted from the real keys, so a key added
    there is counted here."""
    pairs = _metadata(options, 0, "", 0.0, "")
    # key: length (8) and bytes; type (4); string: length (8) and up to 127 bytes; int: 8
    return sum(8 + len(key.encode()) + 4 + (8 + 127 if isinstance(value, str) else 8)
               for key, value in pairs)


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


def run_tune(job: TuneJob, options: TuneOptions,
             progress: ProgressCallback = no_progress) -> TuneResult:
    """Search, write and measure the tuned file; record the search beside it."""
    started = time.perf_counter()
    options = options.with_defaults()
    with _work_dir_held(job):
        return _search(job, options, started, progress)


@contextmanager
def _work_dir_held(job: TuneJob) -> Iterator[None]:
    """The work folder for this run alone: its costs, probes and shards are shared by every
    budget, so a second tune into it is refused at once, not after minutes of work that
    the first is doing too (a folder made for it goes again if that happens)."""
    busy = OutputBusyError(f"another mathq command is computing a tune in {job.work_dir}",
                           "wait for it to finish, then run this again: it reuses the "
                           "costs and probes")
    with removing_new_dirs(job.work_dir):
        make_dirs(job.work_dir)
        with exclusive_lock(job.work_dir / "tune.lock", busy):
            yield


def _search(job: TuneJob, options: TuneOptions, started: float,
            progress: ProgressCallback) -> TuneResult:
    """:func:`run_tune`'s phases, with the work folder held."""
    clock = _PhaseClock()
    with clock("prepare"):
        search = _prepare(job, options, progress)
    with clock("costs"):
        cost_imatrix = _cost_imatrix(job, options, search.calib, progress)
        costs = tensor_costs(job.source, search.model, options.types, search.imatrix,
                             cost_imatrix, job.work_dir / "costs.json", options.threads, progress)
    with clock("probes"):
        probes = _calibrate(job, options, search, costs, cost_imatrix, progress)
    sensitivity = {p.group: p.factor for p in probes}
    plan, plan_kld = _allocate(costs, sensitivity, search, progress)
    with clock("write"):
        size = _write(job, options, search, costs, plan, plan_kld, progress)
    with clock("measure"):
        summary = _measure(job, options, search, progress)
    out = TuneResult(path=job.dest, overrides=job.overrides_path, record=job.record_path,
                     name=job.name, budget=search.budget, size=size, predicted_kld=plan_kld,
                     kld=summary, stock_size=search.stock.size if search.stock else None,
                     probes=tuple(probes), types=plan,
                     seconds=round(time.perf_counter() - started, 3),
                     phase_seconds=clock.seconds)
    _write_record(out, options, sensitivity, search.calib)
    return out


@dataclass(frozen=True)
class _Search:
    """What every phase reads: the model, the budget and its size model, the texts, the
    stock file of ``--match``, and the model's pass over the calibration text
    (``calib_kld``: the options that pass and the probes read with)."""

    model: GGUFSummary
    imatrix: Imatrix | None
    sizes: SizeModel
    budget: int
    heldout: Corpus
    calib: Corpus
    stock: GGUFSummary | None
    reference: ReferenceCache
    calib_kld: KldOptions


def _prepare(job: TuneJob, options: TuneOptions, progress: ProgressCallback) -> _Search:
    """Every check, the texts, the stock file and the BF16 pass over the calibration
    text. An impossible ``--size``/``--bpw`` budget is refused before any work."""
    model, imatrix = preflight(job.source, options)
    header = read_gguf_header(job.source)
    sizes = size_model(model, header.data_offset, _metadata_bound(options))
    shapes = [TensorCost(t.name, group_of(t.name),
                         {ty: tensor_bytes(t, ty) for ty in candidates(t, options.types)},
                         {}) for t in quantizable(model)]
    what = f"the budget {options.budget.option()}"
    if options.budget.match is None:
        check_budget(options.budget.bytes(model.n_params, None), shapes, sizes, what)
    heldout = load_corpus(options.kld.corpus)
    calib = calibration_corpus(job, options, heldout, progress)
    stock = _stock(job, options, progress)
    budget = options.budget.bytes(model.n_params, stock.size if stock else None)
    check_budget(budget, shapes, sizes, what)
    calib_kld = replace(options.kld, max_chunks=options.probe_chunks)
    ref = ensure_reference_file(job.source, "BF16", job.work_dir, calib, calib_kld, progress)
    return _Search(model, imatrix, sizes, budget, heldout, calib, stock, ref, calib_kld)


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


def _calibrate(job: TuneJob, options: TuneOptions, search: _Search, costs: list[TensorCost],
               cost_imatrix: Imatrix, progress: ProgressCallback) -> list[Probe]:
    """Phase 2: one probe per tensor group. The model's shards go when the phase ends,
    finished or stopped: they are a copy, and the journal keeps every finished probe."""
    inputs = ProbeInputs(source=search.model,
                         shards=shards_for(search.model, job.work_dir, costs),
                         reference=search.reference, calib=search.calib,
                         quant_imatrix=search.imatrix, cost_imatrix=cost_imatrix,
                         preferred=_probe_type(options.types), kld=search.calib_kld,
                         threads=options.threads)
    groups = inputs.shards.groups
    probes = []
    prober = Prober(inputs, job.work_dir, progress)
    try:
        for i, g in enumerate(groups):
            progress(Progress("tune probes", i, len(groups), "probes", item=g))
            probe = prober.measure(g, [c for c in costs if c.group == g])
            probes.append(probe)
            progress(Progress("tune probes", i + 1, len(groups), "probes", item=g,
                              info=f"KLD {probe.kld:.5f}"))
    finally:
        prober.finish()
    return probes


def _allocate(costs: list[TensorCost], sensitivity: dict[str, float], search: _Search,
              progress: ProgressCallback) -> tuple[dict[str, str], float]:
    """Phase 3: the types that spend the budget for the least predicted KLD."""
    plan = allocate(costs, sensitivity, search.budget, search.sizes)
    plan_kld = predicted(costs, sensitivity, plan)
    progress(Progress("tune search", search.sizes.file_bytes(costs, plan), search.budget,
                      "bytes", info=f"predicted KLD {plan_kld:.5f}"))
    return plan, plan_kld


def _write(job: TuneJob, options: TuneOptions, search: _Search, costs: list[TensorCost],
           plan: dict[str, str], plan_kld: float, progress: ProgressCallback) -> int:
    """Phase 4a: llama.cpp writes the plan (one override per tensor), checked to hold the
    planned types within the budget; the file's size."""
    text = overrides_text(plan)
    overrides_sha = hashlib.sha256(text.encode()).hexdigest()
    ftype = get_quant(options.budget.match) if options.budget.match else \
        get_quant(FILE_TYPE_OF_TENSOR_TYPE[main_type(costs, plan)])
    result = quantize_gguf(job.source, job.dest, QuantizeOptions(
        ftype, imatrix=options.imatrix, overrides=overrides_pairs(plan),
        threads=options.threads,
        metadata=_metadata(options, search.budget, overrides_sha, plan_kld,
                           search.calib.name)), progress)
    written = {n: result.tensor_types[n] for n in plan}
    if written != plan or result.size > search.budget:
        job.dest.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp wrote {job.dest.name} with "
                            f"{'other types than planned' if written != plan else 'more bytes'}"
                            f" ({result.size} bytes, budget {search.budget})",
                            "this is a bug; please report it")
    write_text_atomic(job.overrides_path, text)
    return result.size


def _measure(job: TuneJob, options: TuneOptions, search: _Search,
             progress: ProgressCallback) -> KldSummary:
    """Phase 4b: the written file's KLD from BF16 on the held-out text."""
    heldout_ref = ensure_reference_file(job.source, "BF16", job.heldout_cache, search.heldout,
                                        options.kld, progress)
    return measure_gguf(job.dest, job.name, job.source.name, heldout_ref, search.heldout,
                        options.kld, progress)


def _probe_type(types: tuple[str, ...]) -> str:
    """The type the probes quantize a group to: the second smallest candidate (the middle
    of the range the budgets of interest use), or the only one."""
    ordered = sorted(types, key=lambda t: (tensor_type_bpw(t), t))
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
        "predicted_kld": result.predicted_kld,
        "kld": result.kld.mean_kld, "kld_err": result.kld.mean_kld_err,
        "heldout": result.kld.corpus, "sensitivity": sensitivity,
        "probes": [asdict(p) for p in result.probes],
        "tensor_types": result.types, "seconds": result.seconds,
        "phase_seconds": result.phase_seconds}
    write_text_atomic(result.record, json.dumps(record, indent=2, sort_keys=True) + "\n")
