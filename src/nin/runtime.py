"""Where and how the code runs: the device, the numeric precision, and the process's memory policy.

    device = resolve_device("cpu")                      # --device text -> torch.device, checked
    amp_dtype = select_precision("auto", device)        # bf16 where the hardware runs it fast, else None
    with autocast(device, amp_dtype): logits = model(images)

Training, evaluation, prediction, visualization and the benchmark all choose device and precision here,
so they agree. `keep_freed_memory` is process-wide; nin calls it where the speed depends on it, whatever the
door: the CLI at its start, `nin.inference.inference_model` (so `Classifier`, `nin.evaluate` and a Python user's
folded model run as fast as `nin predict`), and `nin.engine.train`.

Keeping freed memory: a NiN training step on a CPU allocates and frees the same tens of MB of activations
every step. glibc's malloc serves blocks that large with ``mmap`` and hands them back with ``munmap`` when freed, so every step
the kernel maps fresh pages and zeroes them again: measured here, 3–5 s of system time per 18 steps and
roughly a fifth of the step (docs/performance.md). `keep_freed_memory` tells glibc to serve large blocks from
its heap and never to trim the heap, so the pages of one step are reused by the next. Memory use then stays
at the peak of a step instead of falling between steps; nothing else changes.

    from nin.runtime import keep_freed_memory
    keep_freed_memory()          # idempotent; the CLI, inference_model and train() call it (nin bench after its baseline)

Set ``NIN_KEEP_FREED_MEMORY=0`` to leave malloc as it is. Off Linux/glibc the call does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nin.errors import NinError

__all__ = ["resolve_device", "select_precision", "cpu_has_bf16", "bf16_units", "machine_name", "host",
           "autocast", "keep_freed_memory", "timings", "median_seconds"]


def resolve_device(text: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The device a ``--device`` value names, checked: None means CUDA when available, else the CPU.

    Raises:
        NinError: The text names no device, or a CUDA device this machine does not have.
    """
    if isinstance(text, torch.device):
        return text
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise NinError(f"{flag} {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise NinError(f"{flag} {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NinError(f"{flag} {text}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NinError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.cache
def onednn_has_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU, asked of torch: it needs AVX-512 (or AVX-NE-CONVERT), so an
    AVX2-only CPU says no and runs bf16 convs outside oneDNN, emulated. `cpu_has_bf16` asks the faster question:
    are there bf16 matrix units (AMX or AVX-512 BF16)."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def bf16_units() -> str:
    """Which bf16 matrix units this CPU has: "AMX", "AVX-512 BF16" or "none" (they round differently)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "none"
    return "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "none"


def machine_name(device: str | torch.device = "cpu") -> str:
    """The CUDA device's name for a GPU, else the CPU's model name from /proc/cpuinfo."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host(device: str | torch.device = "cpu") -> dict:
    """Where a run (or a segment of it) ran: machine, bf16 units, cores and threads; recorded with every run."""
    return {"machine": machine_name(device), "bf16": bf16_units(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": str(device)}


PRECISIONS = ("auto", "fp32", "bf16")


def select_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("auto", "fp32", "bf16"): None means fp32.

    "auto" picks bf16 where the hardware runs it fast (AMX / AVX512-BF16 CPUs, bf16 GPUs).

    Raises:
        NinError: Another ``precision`` (an "fp16" asked for is not quietly run as something else).
    """
    if precision not in PRECISIONS:
        raise NinError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse (no mmap for large blocks, no heap trimming).

    Returns True when the setting is in force (now or from an earlier call), False when it was not applied:
    not glibc, or ``NIN_KEEP_FREED_MEMORY=0``. Idempotent; affects allocations made after the call.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("NIN_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Order matters: with mmap off first, no large block allocated in between can be mmapped.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def timings(function: Callable[[], object], repeats: int, warmup: int = 1,
            sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``function()``, after ``warmup`` untimed ones; ``sync``
    (torch.cuda.synchronize) waits for queued GPU work before and after each. The one timing loop of `nin bench`
    and `nin.deploy.backends`."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        function()
        if sync:
            sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1,
                   sync: Callable[[], None] | None = None) -> float:
    """The median of `timings`."""
    return statistics.median(timings(function, repeats, warmup, sync))
