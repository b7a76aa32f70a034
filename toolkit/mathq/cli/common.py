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

from mathq.cli.types import MAX_THREADS, Int, OutputPath, Parallel
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
        "--build-dir", type=OutputPath(folder=True), default=None,
        envvar="MATHQ_BUILD_DIR", show_envvar=True,
        help="Root of the build folders (default ./build); artifacts go to <root>/<model>/.")(f)


def check_url(_ctx: click.Context | None, param: click.Parameter | None, value: Any) -> Any:
    """Callback for URL options (one value or several): each must be http(s)://HOST[:PORT],
    refused at once as bad input (exit 2) rather than failing later as a connection."""
    from urllib.parse import urlsplit

    if value is None:
        return value
    for url in (value,) if isinstance(value, str) else value:
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
                or not port_ok:
            raise click.BadParameter(f"{url!r} is not an http(s) URL; give it as "
                                     "http://HOST:PORT", param=param)
    return value


def echo_json(value: Any) -> None:
    """Print dataclasses, paths and plain values as indented JSON."""
    click.echo(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False))


def gpu_layers_option(f: F) -> F:
    """``--gpu-layers``: llama.cpp's -ngl, defaulting to every layer when it can offload."""
    return click.option(
        "--gpu-layers", type=Int(-1, 1_000_000), default=None, metavar="N",
        help="Layers to put on the GPU (llama.cpp's -ngl; -1: all). Default: all when "
             "llama.cpp was built with GPU support (make install CUDA=1) and finds a GPU, "
             "else 0.")(f)


def threads_option(f: F) -> F:
    """``--threads``: llama.cpp's CPU threads; 0 picks them from where the layers are."""
    return click.option(
        "--threads", type=Int(0, MAX_THREADS), default=0, show_default=True,
        help="llama.cpp threads; 0: every core, or at most 4 when every layer is on the "
             "GPU (the CPU then only feeds it).")(f)


def parallel_option(f: F) -> F:
    """``--parallel/-P``: sequences decoded together; ``auto`` sizes it to the GPU memory."""
    return click.option(
        "--parallel", "-P", type=Parallel(), default="auto", show_default=True,
        help="Sequences decoded together in one context (1-256). auto: as many as the free "
             "GPU memory holds KV caches for (at most 128), 8 on the CPU; requests in "
             "flight per server with --ollama/--endpoint (auto: 8).")(f)


def is_gguf_path(ref: str) -> bool:
    """Whether a RECIPE|GGUF argument names a GGUF file (as `mathq quantize` decides):
    a ``.gguf`` name, or an existing file that is not a ``.toml`` recipe."""
    path = Path(ref)
    return path.suffix.lower() == ".gguf" or (path.is_file() and path.suffix.lower() != ".toml")
