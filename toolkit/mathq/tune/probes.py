"""The tuner's probes: how much KL divergence a unit of weight error in one tensor group costs.

A probe quantizes one group (``attn_q`` of some layers, say) of the BF16 model, leaves the
rest as it is, and measures the KL divergence from BF16 on the calibration text. The group's
factor is that KLD over the probed tensors' importance-weighted squared error, the quantity
the costs estimate for every tensor and type, so factor x error predicts KLD.

Three choices keep a probe cheap at 7B, where one pass over a 512-token chunk takes half a
minute on two cores and the model is 13.8 GB:

- **No model file per probe.** llama.cpp loads a model split over several files
  (``<prefix>-00001-of-0000N.gguf``, gguf-split's layout) and looks each tensor up by name in
  any of them. The BF16 model is copied once into such a set: the first shard holds the
  metadata and the tensors no group holds, then one shard per group. A probe is a folder of
  links to those shards with its own group's shard written anew: it writes one group's
  probed tensors, a few per cent of the model, instead of all of it. The shards go when the
  probe phase ends (a run killed outright leaves them to the next, which reuses them).
- **Some layers.** A group's factor is one number for all its layers, so a probe quantizes
  :data:`PROBE_LAYERS` of them, spread over the depth, and divides by their error only.
- **Text sized to the answer.** A probe reads chunks of the calibration text until its KLD's
  standard error is :data:`PROBE_RELATIVE_SE` of itself, or the text ends.

Measured probes are journalled one line each: a killed or repeated tune keeps them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathq.convert.converter import to_f32
from mathq.convert.gguf_info import GGUFSummary, TensorInfo, tensor_data
from mathq.convert.writer import StreamingGGUFWriter
from mathq.datasets.corpus import Corpus
from mathq.evaluate.kld.measure import KldOptions, ReferenceCache, measure_gguf
from mathq.evaluate.kld.stats import KldStats
from mathq.fsutil import (
    atomic_output,
    ensure_free_space,
    refuse_special_output,
    sha256_file,
    write_text_atomic,
)
from mathq.inputs import UnreadableInput, parse_json, read_text
from mathq.manifest import file_identity
from mathq.progress import ProgressCallback
from mathq.quantize.imatrix_file import Imatrix
from mathq.tune import ggml
from mathq.tune.costs import SLICE_BYTES, imatrix_entry
from mathq.tune.plan import TensorCost

PROBE_LAYERS = 8           # layers of a group a probe quantizes, spread over the depth
PROBE_RELATIVE_SE = 0.1    # a probe reads chunks until its KLD's standard error is this share
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def shard_path(folder: Path, index: int, count: int) -> Path:
    """llama.cpp's name for shard ``index`` (from 0) of ``count``: ``model-00001-of-00010.gguf``."""
    return folder / f"model-{index + 1:05d}-of-{count:05d}.gguf"


@dataclass(frozen=True)
class Shards:
    """The BF16 model as the probes' shards: ``groups[i]``'s tensors in shard ``i + 1``,
    everything else (and the metadata) in shard 0. ``base`` is the single file it copies."""

    base: GGUFSummary
    folder: Path
    groups: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]

    @property
    def count(self) -> int:
        return len(self.groups) + 1

    def shard(self, index: int) -> Path:
        return shard_path(self.folder, index, self.count)

    @property
    def record(self) -> Path:
        """Each finished shard's size and modification time, written once all are there."""
        return self.folder / "shards.json"

    def complete(self) -> bool:
        """Whether every shard is there as it was written (a shard changed since, cut short
        or overwritten in place, has another size or time): else they are written again."""
        try:
            return parse_json(read_text(self.record)) == self._identities()
        except (UnreadableInput, OSError):
            return False

    def _identities(self) -> dict[str, list[int]]:
        out = {}
        for i in range(self.count):
            st = self.shard(i).stat()
            out[self.shard(i).name] = [st.st_size, st.st_mtime_ns]
        return out

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.base.tensors if t.name == name)


def shards_for(base: GGUFSummary, work_dir: Path, costs: Sequence[TensorCost]) -> Shards:
    """Where ``base``'s shards go: a folder named by the file's identity, so a changed
    base is written again and an unchanged one is reused."""
    ident = hashlib.sha256(json.dumps(file_identity(base.path), sort_keys=True)
                           .encode()).hexdigest()[:12]
    members: dict[str, list[str]] = {}
    for c in costs:
        members.setdefault(c.group, []).append(c.name)
    groups = tuple(sorted(members))
    return Shards(base, work_dir / f"shards-{ident}", groups,
                  {g: tuple(members[g]) for g in groups})


def write_shards(shards: Shards) -> None:
    """Copy the base file's tensors into shards, unless a complete, unchanged set is
    there (one a killed run left); anything less is written again from scratch."""
    if shards.complete():
        return
    for stale in shards.folder.parent.glob("shards-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shards.folder.mkdir(parents=True)
    ensure_free_space(shards.folder, shards.base.size,
                      f"the probes' copy of the model ({shards.base.path.name})")
    grouped = {n for names in shards.members.values() for n in names}
    rest = tuple(t.name for t in shards.base.tensors if t.name not in grouped)
    for index, names in enumerate((rest, *(shards.members[g] for g in shards.groups))):
        _write_shard(shards, index, [(shards.tensor(n), None) for n in names])
    write_text_atomic(shards.record, json.dumps(shards._identities()) + "\n")


def _write_shard(shards: Shards, index: int,
                 tensors: Sequence[tuple[TensorInfo, tuple[str, np.ndarray] | None]],
                 dest: Path | None = None) -> None:
    """One shard: each tensor either copied from the base file (``None``) or given as
    (type, bytes). Shard 0 carries the base file's metadata; every shard, the split keys."""
    from gguf import GGMLQuantizationType

    dest = dest or shards.shard(index)
    with atomic_output(dest) as tmp:
        writer = StreamingGGUFWriter(tmp, shards.base.architecture)
        try:
            if index == 0:
                _copy_metadata(shards.base.path, writer)
            writer.gguf.add_uint16("split.no", index)
            writer.gguf.add_uint16("split.count", shards.count)
            writer.gguf.add_int32("split.tensors.count", len(shards.base.tensors))
            for t, given in tensors:
                ty = given[0] if given else t.type
                n_bytes = given[1].nbytes if given else t.n_bytes
                writer.plan(t.name, tuple(reversed(t.shape)), GGMLQuantizationType[ty], n_bytes)
            writer.begin()
            with open(shards.base.path, "rb") as src:
                for t, given in tensors:
                    if given:
                        writer.write_array(t.name, given[1])
                    else:
                        writer.write_range(t.name, src.fileno(), t.offset, t.n_bytes)
            writer.finish()
        finally:
            writer.close()


def _copy_metadata(base: Path, writer: StreamingGGUFWriter) -> None:
    """Every key of ``base`` but the ones the writer or the split layout sets."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(base)
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture" or name in SPLIT_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        if name == "general.alignment":
            writer.gguf.add_custom_alignment(int(field.contents()))
            continue
        writer.gguf.add_key_value(name, field.contents(), vtype, sub_type=sub)


def probed_layers(names: Sequence[str]) -> tuple[str, ...]:
    """The tensors of a group a probe quantizes: all of up to :data:`PROBE_LAYERS`, else that
    many spread evenly from the first layer to the last."""
    if len(names) <= PROBE_LAYERS:
        return tuple(names)
    last = len(names) - 1
    return tuple(names[round(i * last / (PROBE_LAYERS - 1))] for i in range(PROBE_LAYERS))


def probe_type(cost: TensorCost, preferred: str) -> str:
    """The type a probe gives a tensor: ``preferred``, or the smallest it can take where
    its rows do not fit ``preferred``."""
    if preferred in cost.n_bytes:
        return preferred
    return min(cost.n_bytes, key=lambda t: (cost.n_bytes[t], t))


@dataclass(frozen=True)
class Probe:
    """One group's measurement: its KLD from BF16 (and standard error), the probed
    tensors' weighted error, positions read, and whether this run measured it."""

    group: str
    kld: float
    kld_err: float
    error: float
    tokens: int
    reused: bool

    @property
    def factor(self) -> float:
        """KLD per unit of weighted squared error."""
        return max(self.kld, 1e-9) / max(self.error, 1e-30)


class _Journal:
    """Measured probes, one JSON line each, appended and fsynced as each finishes. A line
    that is not a whole probe (cut short by a kill, or edited) is skipped: that probe is
    measured again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        refuse_special_output(path)  # a pipe there would block the first append forever
        if path.is_file():
            for line in read_text(path).splitlines():
                try:
                    row = parse_json(line)
                except UnreadableInput:
                    continue
                if _whole(row):
                    self.done[row["key"]] = row

    def add(self, row: dict) -> None:
        self.done[row["key"]] = row
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            cut = False
            if size:  # a line a kill cut short gets its end first, so this row stays whole
                f.seek(size - 1)
                cut = f.read(1) != b"\n"
            line = ("\n" if cut else "") + json.dumps(row, sort_keys=True) + "\n"
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _whole(row: object) -> bool:
    """Whether a journal row holds a probe: its key and finite numbers."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return False
    numbers = [row.get(k) for k in ("kld", "kld_err", "error", "tokens")]
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in numbers)


@dataclass(frozen=True)
class ProbeInputs:
    """What every probe reads: the BF16 model and its shards, its pass over the
    calibration text, the matrices (the quantizer's and the one weighting the error), the
    preferred probe type and the KLD options."""

    source: GGUFSummary
    shards: Shards
    reference: ReferenceCache
    calib: Corpus
    quant_imatrix: Imatrix | None
    cost_imatrix: Imatrix
    preferred: str
    kld: KldOptions
    threads: int = 0


class Prober:
    """Measure each group's probe once; the shards are written on first need."""

    def __init__(self, inputs: ProbeInputs, work_dir: Path, progress: ProgressCallback) -> None:
        self.inputs, self.work_dir, self.progress = inputs, work_dir, progress
        self.journal = _Journal(work_dir / "probes.jsonl")
        for stale in work_dir.glob("probe-*"):  # a killed run's: the tune's lock is held
            shutil.rmtree(stale, ignore_errors=True)
        self._quant_imatrix_sha = (sha256_file(inputs.quant_imatrix.path)
                                   if inputs.quant_imatrix else None)
        self._cost_imatrix_sha = sha256_file(inputs.cost_imatrix.path)

    def plan(self, costs: Sequence[TensorCost]) -> dict[str, str]:
        """``{tensor: probe type}`` for the probed tensors of one group's ``costs``."""
        by_name = {c.name: c for c in costs}
        return {n: probe_type(by_name[n], self.inputs.preferred)
                for n in probed_layers([c.name for c in costs])}

    def key(self, group: str, plan: Mapping[str, str]) -> str:
        i = self.inputs
        material = {"source": file_identity(i.source.path),
                    "reference": i.reference.key, "group": group,
                    "quant_imatrix": self._quant_imatrix_sha,
                    "cost_imatrix": self._cost_imatrix_sha,
                    "types": dict(sorted(plan.items())), "se": PROBE_RELATIVE_SE}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]

    def measure(self, group: str, costs: Sequence[TensorCost]) -> Probe:
        """The group's probe: from the journal, else written, measured and journalled."""
        plan = self.plan(costs)
        key = self.key(group, plan)
        row = self.journal.done.get(key)
        if row is not None:
            return Probe(group, row["kld"], row["kld_err"], row["error"], row["tokens"], True)
        started = time.perf_counter()
        shards = self.inputs.shards
        write_shards(shards)
        folder = self.work_dir / f"probe-{key}"
        try:
            error = _write_probe(self.inputs, folder, group, plan)
            stats = measure_gguf(shard_path(folder, 0, shards.count), f"probe {group}",
                                 self.inputs.source.path.name, self.inputs.reference,
                                 self.inputs.calib, self.inputs.kld, self.progress,
                                 enough=_settled)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.journal.add({"key": key, "group": group, "kld": stats.mean_kld,
                          "kld_err": stats.mean_kld_err, "error": error,
                          "tokens": stats.n_tokens, "types": plan,
                          "seconds": round(time.perf_counter() - started, 3)})
        return Probe(group, stats.mean_kld, stats.mean_kld_err, error, stats.n_tokens, False)

    def finish(self) -> None:
        """The probe phase is over: remove the shards (a copy of the model)."""
        shutil.rmtree(self.inputs.shards.folder, ignore_errors=True)


def _settled(stats: KldStats) -> bool:
    return stats.mean_kld_err <= PROBE_RELATIVE_SE * stats.mean_kld


def _write_probe(inputs: ProbeInputs, folder: Path, group: str,
                 plan: Mapping[str, str]) -> float:
    """The probe's folder: links to the shards but ``group``'s, which is written with
    ``plan``'s tensors quantized. Returns those tensors' weighted squared error."""
    shards = inputs.shards
    index = shards.groups.index(group) + 1
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's half-made probe
    folder.mkdir(parents=True)
    for i in range(shards.count):
        if i != index:
            shard_path(folder, i, shards.count).symlink_to(shards.shard(i).resolve())
    error = 0.0
    tensors: list[tuple[TensorInfo, tuple[str, np.ndarray] | None]] = []
    for name in shards.members[group]:
        t = shards.tensor(name)
        if name in plan:
            data, err = _quantize(inputs, t, plan[name])
            error += err
            tensors.append((t, (plan[name], data)))
        else:
            tensors.append((t, None))
    _write_shard(shards, index, tensors, dest=shard_path(folder, index, shards.count))
    return error


def _quantize(inputs: ProbeInputs, t: TensorInfo, type_name: str) -> tuple[np.ndarray, float]:
    """``t`` quantized to ``type_name`` with ggml's quantizer (the bytes llama.cpp would
    write), and its weighted squared error."""
    from gguf import GGMLQuantizationType

    n_per_row = t.shape[0]
    n_rows = t.n_elements // n_per_row
    tid = int(GGMLQuantizationType[type_name])
    used = imatrix_entry(inputs.quant_imatrix, t.name, n_per_row)
    weights = imatrix_entry(inputs.cost_imatrix, t.name, n_per_row)
    step = max(1, SLICE_BYTES // (4 * n_per_row))
    raw = np.asarray(tensor_data(inputs.shards.base.path, t)).reshape(-1, n_per_row)
    parts, error = [], 0.0
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        rows = to_f32(raw[start:stop], t.type)
        data = ggml.quantize_rows(tid, rows, used, inputs.threads)
        sq = np.square(ggml.dequantize_rows(tid, data, stop - start, n_per_row) - rows,
                       dtype=np.float64)
        error += float((sq @ weights).sum() if weights is not None else sq.sum())
        parts.append(data)
    return np.concatenate(parts), error
