"""Where every artifact of a build lives: the one place that names paths.

``build/<model>/`` holds the Hugging Face snapshot, the GGUF files, Modelfiles, smoke
results, reports and ``manifest.json``. Every stage asks this module for its paths, so a
stage never needs to know how another stage lays out its files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUILD_DIR_ENV = "MATHQ_BUILD_DIR"


def overrides_file(gguf: Path) -> Path:
    """``<model>-<NAME>.overrides.txt`` beside a tuned GGUF: its tensor types as
    ``llama-quantize --tensor-type-file`` reads them (published with the file)."""
    return gguf.with_name(gguf.name.removesuffix(".gguf") + ".overrides.txt")


def default_build_root() -> Path:
    """``$MATHQ_BUILD_DIR`` if set, else ``./build``, read when asked (not at import)."""
    return Path(os.environ.get(BUILD_DIR_ENV) or "build")


@dataclass(frozen=True)
class BuildLayout:
    """Paths of one model's build folder."""

    root: Path
    name: str

    @classmethod
    def for_model(cls, name: str, build_root: Path | None = None) -> BuildLayout:
        """The layout of ``<build_root>/<name>/``."""
        return cls((build_root or default_build_root()) / name, name)

    def key(self, path: Path) -> str:
        """``path``'s manifest key: its path inside the build folder, with ``/``."""
        return Path(path).relative_to(self.root).as_posix()

    @property
    def hf_dir(self) -> Path:
        """The Hugging Face snapshot (config, tokenizer, safetensors)."""
        return self.root / "hf"

    @property
    def manifest(self) -> Path:
        """``manifest.json``: what each artifact was made from."""
        return self.root / "manifest.json"

    def require(self) -> None:
        """Raise InputFileError when the build folder does not exist: a command that only
        reads it (report) says so and creates nothing, rather than making a folder where a
        mistyped ``--build-dir`` points."""
        if not self.root.is_dir():
            from mathq.errors import InputFileError

            raise InputFileError(f"no build folder of {self.name} at {self.root}",
                                 f"check --build-dir, or make one: mathq build {self.name}")

    def gguf(self, quant: str) -> Path:
        """``<name>-<QUANT>.gguf``, e.g. ``deepseek-math-7b-rl-Q4_K_M.gguf``."""
        return self.root / f"{self.name}-{quant}.gguf"

    @property
    def imatrix(self) -> Path:
        """The importance matrix of ``mathq imatrix`` (llama.cpp's GGUF imatrix format)."""
        return self.root / f"{self.name}.imatrix.gguf"

    @property
    def modelfiles_dir(self) -> Path:
        """Modelfiles for this build's GGUFs, one per Ollama tag."""
        return self.root / "modelfiles"

    @property
    def smoke_dir(self) -> Path:
        """Per-problem JSONL and summary JSON of smoke runs."""
        return self.root / "smoke"

    def smoke_results(self, quant: str) -> Path:
        """Per-problem results of one variant's smoke test (JSONL, appended as it runs)."""
        return self.smoke_dir / f"{quant}.jsonl"

    def smoke_settings(self, quant: str) -> Path:
        """What one variant's smoke results were made with, so a rerun resumes only runs
        with the same settings."""
        return self.smoke_dir / f"{quant}.settings.json"

    def smoke_summary(self, quant: str) -> Path:
        """One variant's :class:`mathq.evaluate.summaries.SmokeSummary`."""
        return self.smoke_dir / f"{quant}.summary.json"

    @property
    def bench_dir(self) -> Path:
        """Speed measurements, one JSON per variant."""
        return self.root / "bench"

    def bench_summary(self, quant: str) -> Path:
        """One variant's :class:`mathq.evaluate.summaries.BenchSummary`."""
        return self.bench_dir / f"{quant}.json"

    @property
    def kld_dir(self) -> Path:
        """KL-divergence results, and the cached reference logits."""
        return self.root / "kld"

    def kld_summary(self, quant: str) -> Path:
        """One variant's :class:`mathq.evaluate.summaries.KldSummary`."""
        return self.kld_dir / f"{quant}.json"

    @property
    def report_dir(self) -> Path:
        """report.md, report.html, report.json and plots."""
        return self.root / "report"

    @property
    def digest_cache(self) -> Path:
        """SHA-256 of the build's big files, keyed by size and mtime so reruns skip rehashing."""
        return self.root / "digests.json"

    @property
    def publish_state(self) -> Path:
        """What ``publish`` created and pushed where, so a rerun sends nothing twice."""
        return self.root / "publish.json"
