"""Which compute device a command uses, and whether training on it runs in bf16, checked before any work."""

from __future__ import annotations

# torch is imported when a device is asked about: --device cpu, and every option check, are answered without it.
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import LoraRanksError

__all__ = ["DeviceError", "PrecisionError", "resolve_device", "resolve_precision", "precision_key", "bf16_units",
           "cpu_bf16_units", "CPU_BF16_FLAGS", "HIDE_CPU_BF16"]

#: CPU flags (as Linux's /proc/cpuinfo names them) of bf16 matrix units: AVX-512 BF16 (AMD Zen 4 and later, Intel
#: Cooper Lake and later) and AMX-BF16 (Intel Sapphire Rapids and later). Without them torch emulates bf16 matrix
#: products, slower than float32 (4x slower for a 384 x 576 x 1536 autocast linear on an AVX2-only EPYC, measured).
CPU_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
#: Environment variable: "0" hides the CPU's bf16 units (``precision`` auto then trains in float32, and a forced bf16
#: is refused), as CUDA_VISIBLE_DEVICES hides GPUs; the test suite sets it so that its numbers are the same on
#: every CI machine.
HIDE_CPU_BF16 = "LORA_RANKS_CPU_BF16"


class DeviceError(LoraRanksError):
    """A device option that names a device this machine does not have."""


class PrecisionError(DeviceError):
    """bf16 training asked for on a device without bf16 units."""


def resolve_device(device: str | None) -> str:
    """``device`` ("cpu", "cuda" or "cuda:N"), or CUDA when available else the CPU.

    Counting devices creates no CUDA context (the measuring processes of ``check`` need the whole device).

    Raises:
        DeviceError: a CUDA device that is not there (CPU-only torch, or an index past the device count).
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise DeviceError(f"device {device} is not available here: torch {torch.__version__} ({build}) sees "
                              f"{count} CUDA device(s); use --device cpu or leave --device unset")
    return device


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units by flag name ("avx512_bf16", "amx_bf16" or both, comma-separated), or None.

    On Linux, the flags of /proc/cpuinfo (what the CPU and the kernel offer; a virtual machine shows what its
    hypervisor passes through); elsewhere torch's own CPU detection (cpuinfo: AVX-512 BF16, AMX tiles). Other
    CPUs (ARM's bf16 extension included) count as having none: not measured here. ``LORA_RANKS_CPU_BF16=0``
    hides them.
    """
    if os.environ.get(HIDE_CPU_BF16) == "0":
        return None
    return _detected_cpu_bf16_units()


@functools.lru_cache(maxsize=1)
def _detected_cpu_bf16_units() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        text = None
    if text is not None:
        return _bf16_flags(text)
    import torch

    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return ", ".join(flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()) or None


def _bf16_flags(cpuinfo: str) -> str | None:
    """The ``CPU_BF16_FLAGS`` among the first "flags" line of a /proc/cpuinfo text (comma-separated), or None."""
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return ", ".join(flag for flag in CPU_BF16_FLAGS if flag in flags) or None


def bf16_units(device) -> str | None:
    """What gives ``device`` (a ``torch.device`` or its name) bf16 matrix arithmetic, in words ("CPU avx512_bf16",
    "CUDA NVIDIA H100 80GB HBM3"), or None: a CUDA device of compute capability 8.0 or more (Ampere; ROCm devices
    all count), a CPU with ``CPU_BF16_FLAGS``. A CUDA device older than Ampere, which torch can emulate bf16 on,
    counts as having none."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        with torch.cuda.device(dev):
            try:
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch before 2.3: no emulation check, capability 8.0+ only
                native = torch.cuda.is_bf16_supported()
            return f"CUDA {torch.cuda.get_device_name(dev)}" if native else None
    if dev.type == "cpu":
        units = cpu_bf16_units()
        return f"CPU {units}" if units else None
    return None


def resolve_precision(precision: str, device, *, flag: str = "precision") -> bool:
    """Whether training on ``device`` runs under bf16 autocast: "auto" where the device has bf16 units
    (``bf16_units``), "bf16" always (refused without them), "float32" never.

    Args:
        flag: how the message names the option (the CLI passes its flag, e.g. "--lora-precision").

    Raises:
        PrecisionError: "bf16" on a device without bf16 units; raised before any model is loaded by every caller
            (the CLI's preflight, ``run_preliminary_finetune``, ``prepare_lora_run``, ``check_inputs``).
        ValueError: an unknown ``precision``.
    """
    if precision not in ("auto", "bf16", "float32"):
        raise ValueError(f"precision must be auto, bf16 or float32, got precision={precision!r}")
    if precision == "float32":
        return False
    units = bf16_units(device)
    if units is None and precision == "bf16":
        raise PrecisionError(f"{flag} bf16 is not available here: {_lacking(device)}; use {flag} auto (bf16 "
                             "where the hardware has it) or float32")
    return units is not None


def precision_key(settings: dict, device: str | None = None) -> dict:
    """``settings`` (a training settings' ``key_dict``) with its ``precision`` as it runs on ``device`` (None: CUDA
    when available, else the CPU), for the digests of committed results: "auto" means float32 on one machine and
    bf16 on another, and a result must not be reused, or mixed with others, across that difference. A run in bf16
    is keyed "bf16"; a run in float32 keeps the spelling "auto" (whatever was asked), under which every result
    committed before this key existed ran (in float32), so that those stay valid."""
    if "precision" not in settings:
        return settings
    bf16 = resolve_precision(settings["precision"], resolve_device(device))
    return {**settings, "precision": "bf16" if bf16 else "auto"}


def _lacking(device) -> str:
    """Why ``device`` has no bf16 units, in words."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"CUDA device {dev} has no bf16 units (compute capability below 8.0)"
    if dev.type != "cpu":
        return f"bf16 training is not supported on device type {dev.type}"
    if os.environ.get(HIDE_CPU_BF16) == "0" and _detected_cpu_bf16_units():
        return f"the CPU's bf16 units ({_detected_cpu_bf16_units()}) are hidden by {HIDE_CPU_BF16}=0"
    return f"training runs on the CPU, which has no bf16 units (no {' or '.join(CPU_BF16_FLAGS)} flag)"


_T = TypeVar("_T")


def cuda_or_cpu(run: Callable[[Any], _T], device: Any) -> tuple[_T, bool]:
    """``run(device)`` (``device`` a ``torch.device`` or its name); when it is a CUDA device that runs out of memory
    (``torch.OutOfMemoryError``), its cache emptied and ``run(torch.device("cpu"))`` instead: the one place the
    numerics fall back to the CPU. Returns ``(result, fell_back)``. On any other device the error propagates."""
    import torch

    dev = torch.device(device)
    try:
        return run(dev), False
    except torch.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        torch.cuda.empty_cache()
        return run(torch.device("cpu")), True
