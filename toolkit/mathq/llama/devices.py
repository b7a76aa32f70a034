"""Where llama.cpp runs: GPU offload support, the devices, their memory, and mathq's defaults.

mathq asks the llama.cpp it loaded rather than the machine: ``llama_supports_gpu_offload()``
is true only for a GPU build (``make install CUDA=1``) that found a GPU, so a CPU build on a
GPU machine, and a CUDA build on a machine without one, both get the CPU defaults.

The defaults, applied wherever mathq loads a model (smoke, bench, kld, imatrix) unless the
command line says otherwise:

- **Layers on the GPU** (``--gpu-layers``): all of them (:data:`ALL_LAYERS`) when offload is
  supported, else 0.
- **Threads** (``--threads``): on the CPU every core, as before. With every layer offloaded
  the CPU only feeds the GPU (token embeddings, batch set-up, sampling in Python); more
  threads then only spin against the Python thread, so :data:`GPU_THREADS` at most. A
  partial offload computes the remaining layers on the CPU and keeps every core.
- **Sequences decoded together** (``mathq smoke --parallel auto``): :func:`choose_parallel`.

Device names and memory come from ggml's backend device API (``ggml_backend_dev_*``, exported
by the libggml that llama-cpp-python ships but not wrapped by it), bound here with ctypes;
``nvidia-smi`` is the fallback when those functions cannot be bound.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

#: ``n_gpu_layers`` for "every layer": llama.cpp reads a negative count as all of them.
ALL_LAYERS = -1
#: Thread cap when every layer is on the GPU (llama.cpp's own default thread count, 4).
GPU_THREADS = 4
#: ``--parallel auto`` on the CPU: llama.cpp's batching gains flatten out around 8 sequences
#: there (README, smoke-test throughput), and it is what mathq has always used.
CPU_PARALLEL = 8
#: ``--parallel auto`` on a GPU never goes beyond this many sequences.
PARALLEL_CAP = 128
#: GPU memory kept free for llama.cpp's compute buffers and the logits: a share of what is
#: free, and at least a fixed amount.
RESERVE_SHARE = 0.10
RESERVE_MIN_BYTES = 1 << 30

# enum ggml_backend_dev_type (ggml/include/ggml-backend.h of the vendored ggml)
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can put layers on a GPU it found."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve_gpu_layers(requested: int | None) -> int:
    """``--gpu-layers`` as given, else all layers with GPU offload and none without."""
    if requested is not None:
        return requested
    return ALL_LAYERS if gpu_offload_supported() else 0


def offloaded_layers(gpu_layers: int, n_layer: int, gpu: bool) -> int:
    """How many of the model's ``n_layer + 1`` offloadable layers (the output layer counts
    as one) llama.cpp puts on the GPU: its rule in ``llama_model::load_tensors``."""
    if not gpu:
        return 0
    wanted = n_layer + 1 if gpu_layers < 0 else gpu_layers
    return min(wanted, n_layer + 1)


def default_threads(requested: int, offloaded: int, n_layer: int) -> int:
    """``--threads`` as given, else every core, or :data:`GPU_THREADS` when all
    ``n_layer + 1`` layers are offloaded (see the module docstring)."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return min(GPU_THREADS, cores) if offloaded >= n_layer + 1 else cores


@dataclass(frozen=True)
class Device:
    """One compute device as llama.cpp (or nvidia-smi) names it, with its memory in bytes."""

    name: str
    description: str
    kind: str
    free_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def used_bytes(self) -> int | None:
        """Memory in use on the whole device (every process), if known."""
        if self.free_bytes is None or self.total_bytes is None:
            return None
        return self.total_bytes - self.free_bytes


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml from llama-cpp-python, with the device functions' signatures declared."""
    from llama_cpp import _ggml

    lib = _ggml.libggml
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
        ("ggml_backend_dev_count", sz, []),
        ("ggml_backend_dev_get", p, [sz]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [p]),
        ("ggml_backend_dev_type", ctypes.c_int, [p]),
        ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
    ):
        fn = getattr(lib, name)  # AttributeError: not exported by this build
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def llama_devices() -> list[Device]:
    """Every device llama.cpp registered (CPU included), with its free and total memory."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    lib = _ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(name=(lib.ggml_backend_dev_name(dev) or b"").decode(),
                          description=(lib.ggml_backend_dev_description(dev) or b"").decode(),
                          kind=_DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
                          free_bytes=free.value or None, total_bytes=total.value or None))
    return out


def nvidia_smi_devices() -> list[Device]:
    """GPUs as ``nvidia-smi`` lists them (empty when it is missing or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> list[Device]:
    """Rows of ``nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,
    noheader,nounits`` (MiB) as devices named ``GPU0``, ``GPU1``, ..."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3 or not parts[0]:
            continue
        try:
            used, total = (int(float(x) * (1 << 20)) for x in parts[1:])
        except ValueError:
            continue
        out.append(Device(name=f"GPU{len(out)}", description=parts[0], kind="gpu",
                          free_bytes=total - used, total_bytes=total))
    return out


def gpu_devices() -> list[Device]:
    """The GPUs llama.cpp offloads to (ggml's device list; nvidia-smi's if it cannot be read).

    Empty without GPU offload support: a GPU this llama.cpp cannot use is not one of its
    devices.
    """
    if not gpu_offload_supported():
        return []
    try:
        return [d for d in llama_devices() if d.kind in ("gpu", "igpu")]
    except (AttributeError, OSError):
        return nvidia_smi_devices()


def gpu_free_bytes() -> int | None:
    """Free memory summed over the GPUs llama.cpp uses; None without one, or unknown."""
    free = [d.free_bytes for d in gpu_devices()]
    if not free or any(f is None for f in free):
        return None
    return sum(f for f in free if f is not None)


def describe_devices(devices: list[Device]) -> str:
    """``NVIDIA H200`` (or ``2 x NVIDIA H200``) for summaries; ``CPU`` without a GPU."""
    if not devices:
        return "CPU"
    names = [d.description or d.name for d in devices]
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"
    return ", ".join(names)


# ---------------------------------------------------------------------------------------
# --parallel auto


def kv_bytes_per_element(kv_type: str | None) -> float:
    """Bytes per cached value: F16 (llama.cpp's default) unless ``kv_type`` names another
    ggml type (``q8_0``: 34 bytes per block of 32)."""
    if kv_type is None:
        return 2.0
    from mathq.recipes.quants import tensor_type_bpw

    return tensor_type_bpw(kv_type) / 8


def kv_bytes_per_sequence(n_ctx_seq: int, n_layer: int, n_embd_k: int, n_embd_v: int,
                          bytes_per_element: float) -> int:
    """Bytes of one sequence's KV cache: ``n_ctx_seq`` cells of K and V in every layer."""
    return int(n_ctx_seq * n_layer * (n_embd_k + n_embd_v) * bytes_per_element)


@dataclass(frozen=True)
class ParallelChoice:
    """How many sequences a smoke run decodes together, and why (kept in its summary)."""

    parallel: int
    reason: str
    requested: str = "auto"
    device: str = "CPU"
    free_bytes: int | None = None
    kv_bytes_per_seq: int | None = None
    cap: int | None = None


def choose_parallel(n_requests: int, *, gpu: bool, free_bytes: int | None,
                    kv_bytes_per_seq: int, device: str = "CPU", cap: int = PARALLEL_CAP,
                    cpu_default: int = CPU_PARALLEL) -> ParallelChoice:
    """``--parallel auto``: on a GPU, as many sequences as the free memory holds KV caches
    for (after a reserve for compute buffers), at most ``cap``; on the CPU ``cpu_default``.
    Never more than there are requests. ``free_bytes`` is measured with the weights loaded.
    """
    n = max(1, n_requests)
    if not gpu:
        p = min(cpu_default, n)
        return ParallelChoice(p, f"CPU: the default of {cpu_default} sequences"
                              + (f", {n} problems" if p < cpu_default else ""),
                              device=device, kv_bytes_per_seq=kv_bytes_per_seq)
    if free_bytes is None:
        p = min(cpu_default, n)
        return ParallelChoice(p, f"GPU free memory unknown: the default of {cpu_default}",
                              device=device, kv_bytes_per_seq=kv_bytes_per_seq)
    reserve = max(RESERVE_MIN_BYTES, int(free_bytes * RESERVE_SHARE))
    room = max(0, free_bytes - reserve)
    fits = room // kv_bytes_per_seq if kv_bytes_per_seq > 0 else cap
    p = max(1, min(fits, cap, n))
    mib = 1 << 20
    why = (f"{free_bytes / mib:,.0f} MiB free on the GPU less a {reserve / mib:,.0f} MiB "
           f"reserve holds {fits} KV caches of {kv_bytes_per_seq / mib:,.1f} MiB")
    if fits < 1:
        why += "; trying 1"
    elif p == n and n < min(fits, cap):
        why += f"; all {n} problems at once"
    elif p == cap and cap < fits:
        why += f"; capped at {cap}"
    return ParallelChoice(p, why, device=device, free_bytes=free_bytes,
                          kv_bytes_per_seq=kv_bytes_per_seq, cap=cap)
