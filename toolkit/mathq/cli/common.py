"""Options and output helpers every command shares.

Commands import stage modules inside their bodies, so ``mathq --help`` never loads
llama.cpp, huggingface_hub or matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mathq.fsutil import to_jsonable

F = TypeVar("F", bound=Callable[..., Any])


def quiet_option(f: F) -> F:
    """``--quiet``: no progress bars (they are also off when stderr is not a terminal)."""
    return click.option("--quiet", "-q", is_flag=True,
                        help="No progress output (also off when stderr is not a terminal).")(f)


def json_option(f: F) -> F:
    """``--json``: print the result as JSON on stdout, for scripts."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout.")(f)


def build_dir_option(f: F) -> F:
    """``--build-dir``: the root under which ``<model>/`` folders are made."""
    return click.option(
        "--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        envvar="MATHQ_BUILD_DIR", show_envvar=True,
        help="Root of the build folders (default ./build); artifacts go to <root>/<model>/.")(f)


def echo_json(value: Any) -> None:
    """Print dataclasses, paths and plain values as indented JSON."""
    click.echo(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False))


def is_gguf_path(ref: str) -> bool:
    """Whether a RECIPE|GGUF argument names a GGUF file (as `mathq quantize` decides):
    a ``.gguf`` name, or an existing file that is not a ``.toml`` recipe."""
    path = Path(ref)
    return path.suffix.lower() == ".gguf" or (path.is_file() and path.suffix.lower() != ".toml")
