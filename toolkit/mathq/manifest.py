"""``manifest.json``: what each artifact of a build was made from.

Each entry records the stage, the inputs (hashes, commits), the settings and the tool
versions that produced an artifact. ``build`` redoes a stage only when that record no
longer matches, and the record is written only after the artifact was renamed into place,
so an entry always describes a finished file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mathq.errors import MathqError
from mathq.fsutil import write_text_atomic
from mathq.inputs import UnreadableInput, parse_json, read_text

MANIFEST_VERSION = 1

# What an artifact was made from: (inputs, settings), as a stage records it and as
# ``build`` recomputes it to decide whether the artifact is still current.
Fingerprint = tuple[dict[str, Any], dict[str, Any]]


def file_identity(path: Path) -> dict[str, Any]:
    """Name, size and modification time: cheap to read, and every stage writes its files by
    renaming a finished ``.partial``, so a rebuilt file always gets a new identity."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class ArtifactRecord:
    """How one artifact was made."""

    stage: str
    inputs: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    created: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    #: Files made beside the artifact that later steps read (a smoke summary's results),
    #: by key, with their :func:`file_identity` when the artifact was recorded.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def same_recipe(self, inputs: dict[str, Any], settings: dict[str, Any]) -> bool:
        """True when this record was made from exactly these inputs and settings."""
        return self.inputs == inputs and self.settings == settings

    def outputs_intact(self, root: Path) -> bool:
        """True when every file made beside the artifact is still as it was recorded: one
        replaced or cut short since (by hand, or by another tool) leaves the artifact
        describing files that are no longer there."""
        for key, identity in self.outputs.items():
            try:
                if file_identity(root / key) != identity:
                    return False
            except OSError:
                return False
        return True


def tool_versions() -> dict[str, str]:
    """Versions of the software that shapes artifacts, for the record."""
    out = {}
    for dist in ("mathq", "gguf", "llama-cpp-python", "huggingface-hub"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class Manifest:
    """A build folder's ``manifest.json``, read and updated under a file lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.with_name(self.path.name + ".lock")):
            yield

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": MANIFEST_VERSION, "artifacts": {}}
        try:
            data = parse_json(read_text(self.path))
        except UnreadableInput as e:
            raise MathqError(f"cannot read build manifest {e.describe(self.path)}",
                             "delete it and rerun; artifacts will be checked again") from None
        data.setdefault("artifacts", {})
        return data

    def artifacts(self) -> dict[str, ArtifactRecord]:
        """Every recorded artifact, keyed by its path relative to the build folder."""
        return {k: ArtifactRecord(**v) for k, v in self._read()["artifacts"].items()}

    def get(self, key: str) -> ArtifactRecord | None:
        """The record of one artifact, or None."""
        return self.artifacts().get(key)

    def record(self, key: str, stage: str, inputs: dict[str, Any],
               settings: dict[str, Any] | None = None, size: int | None = None,
               result: dict[str, Any] | None = None,
               outputs: Sequence[str] = ()) -> ArtifactRecord:
        """Record (or replace) how artifact ``key`` was made, with current tool versions.
        ``result`` holds what making it found (a search's figures); it is never compared.
        ``outputs`` are the keys of files made beside it, recorded with their identity."""
        root = self.path.parent
        rec = ArtifactRecord(stage=stage, inputs=dict(inputs), settings=dict(settings or {}),
                             tools=tool_versions(), size=size, created=time.time(),
                             result=dict(result or {}),
                             outputs={k: file_identity(root / k) for k in outputs})
        with self._locked():
            data = self._read()
            data["artifacts"][key] = asdict(rec)
            write_text_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return rec

    def forget(self, key: str) -> None:
        """Drop an artifact's record (before it is rebuilt)."""
        with self._locked():
            data = self._read()
            if data["artifacts"].pop(key, None) is not None:
                write_text_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
