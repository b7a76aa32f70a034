"""Fixtures of the hostile suite: one pristine build of the demo model (copied into every
case's own folder), the misbehaving servers, and a fresh world folder per case."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hostile.harness import (
    ENOSPC,
    EROFS,
    HostileServer,
    closed_port_url,
    full_dir,
    read_only_dir,
    simulate_os_error,
)

REPO = Path(__file__).resolve().parents[2]
SERVER_MODES = ("hang", "reset", "garbage", "notjson", "http500", "trickle")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build/tiny-demo/ with the BF16 and Q8_0 GGUFs and the Modelfiles, made once."""
    from mathq.convert.converter import ConvertOptions
    from mathq.convert.stage import convert_recipe
    from mathq.modelfile.stage import write_modelfiles
    from mathq.quantize.core import QuantizeOptions
    from mathq.quantize.stage import quantize_variants, resolve_quantize_input
    from mathq.recipes.quants import get_quant
    from mathq.recipes.recipe import load_recipe

    root = tmp_path_factory.mktemp("pristine") / "build"
    recipe = load_recipe("tiny-demo")
    convert_recipe(recipe, ConvertOptions(), build_root=root)
    job = resolve_quantize_input("tiny-demo", root)
    quantize_variants(job, [QuantizeOptions(get_quant("Q8_0"))])
    write_modelfiles(recipe, None, root, ("latest",))
    return root


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, str]]:
    """URL of each misbehaving server, and of a port nobody listens on."""
    running = {mode: HostileServer(mode) for mode in SERVER_MODES}
    urls = {mode: s.url for mode, s in running.items()}
    urls["closed"] = closed_port_url()
    yield urls
    for s in running.values():
        s.close()


@dataclass
class World:
    """One case's folder: ``build/`` (a copy of the pristine build), ``ro/`` (read-only),
    ``full/`` (a full disk) and whatever the case's setup adds."""

    root: Path
    build: Path
    ro: Path
    full: Path
    urls: dict[str, str]
    simulated: tuple[str, ...]

    def simulate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where no file system could be mounted, make writes under ``ro/`` fail with EROFS
        and under ``full/`` with ENOSPC (after the case's own set-up has written its files)."""
        if "read-only" in self.simulated:
            simulate_os_error(monkeypatch, self.ro, EROFS)
        if "disk full" in self.simulated:
            simulate_os_error(monkeypatch, self.full, ENOSPC)

    @property
    def bf16(self) -> Path:
        return self.build / "tiny-demo" / "tiny-demo-BF16.gguf"

    @property
    def q8(self) -> Path:
        return self.build / "tiny-demo" / "tiny-demo-Q8_0.gguf"

    def values(self) -> dict[str, str]:
        """The placeholders case arguments are formatted with."""
        return {"w": str(self.root), "build": str(self.build), "ro": str(self.ro),
                "full": str(self.full), "bf16": str(self.bf16), "q8": str(self.q8),
                "repo": str(REPO), **{f"url_{k}": v for k, v in self.urls.items()}}


def _copy_build(src: Path, dest: Path) -> None:
    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(".gguf"):
            os.link(s, d)  # never modified in place: mathq only renames new files over
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy)


@pytest.fixture
def world(tmp_path: Path, pristine: Path, servers: dict[str, str],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    root = tmp_path / "w"
    root.mkdir()
    build = root / "build"
    _copy_build(pristine, build)
    monkeypatch.setenv("MATHQ_BUILD_DIR", str(build))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with read_only_dir(root) as ro, full_dir(root) as full:
        simulated = []
        if ro is None:
            ro = root / "ro"
            simulated.append("read-only")
        if full is None:
            full = root / "full"
            simulated.append("disk full")
        yield World(root, build, ro, full, servers, tuple(simulated))
        monkeypatch.undo()
