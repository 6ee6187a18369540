"""Which compute device a command uses, checked before any work."""

from __future__ import annotations

from .errors import LoraRanksError

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(LoraRanksError):
    """A device option that names a device this machine does not have."""


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
