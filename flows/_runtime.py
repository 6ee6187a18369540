"""Process-level defaults applied before Prefect is imported (quiet, offline-friendly, patient start-up)."""

from __future__ import annotations

import os

DEFAULTS = {
    # No telemetry: these machines are offline and the server would log a connection error.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The ephemeral API server migrates its SQLite database on first start: ~20 s on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def max_workers() -> int:
    """Concurrent layer tasks per flow run: LORA_RANKS_MAX_WORKERS, default 2 (each task's matrix
    products already use every core; more threads mostly add memory)."""
    value = os.environ.get("LORA_RANKS_MAX_WORKERS", "2")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"LORA_RANKS_MAX_WORKERS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"LORA_RANKS_MAX_WORKERS must be a positive integer, got {value!r}")
    return n
