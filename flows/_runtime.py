"""Process-level settings for the flows: Prefect's defaults, applied before Prefect is imported (the one place
they are set: the Makefile, the CLI, the tests and the workers all come through here), and the task runner,
chosen by environment so that deployments pick it per work pool or run (job_variables.env):
    LORA_RANKS_TASK_RUNNER   threads (default) | processes | dask
    LORA_RANKS_MAX_WORKERS   concurrent layer tasks (default 2; processes: one per visible GPU if any)
    LORA_RANKS_DASK_ADDRESS  scheduler of an existing Dask cluster (tcp://host:8786); unset = local cluster

This module must not import torch: the process pool's worker initializer lives here and has to set
CUDA_VISIBLE_DEVICES and the thread budget before torch is first imported in the worker.
"""

from __future__ import annotations

# Prefect's task runners and torch are imported by the functions that need them: the command line imports this
# module first, to set Prefect's defaults before Prefect itself is imported.
import multiprocessing
import os
import typing
from pathlib import Path

from pydantic import Field

from lora_ranks.errors import LoraRanksError  # light: no torch (the package imports its stages on first use)

_CHECKOUT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    # No telemetry: these machines are offline and the server would log a connection error.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The ephemeral API server migrates its SQLite database on first start: ~20 s on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
RUNNERS = ("threads", "processes", "dask")


class EnvironmentSettingError(LoraRanksError):
    """A LORA_RANKS_* environment variable with a value it cannot take (named in the message)."""


def apply_defaults() -> None:
    """Set Prefect's defaults unless the environment already sets them. Run from a source checkout (the README's
    setup), the ephemeral API keeps its SQLite database in the checkout's ``.prefect/``."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "lora_ranks").is_dir():
        os.environ.setdefault("PREFECT_HOME", str(_CHECKOUT / ".prefect"))


def _positive_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise EnvironmentSettingError(f"{name} must be a positive integer, got {value!r}")
    return n


def max_workers() -> int:
    """Concurrent layer tasks: LORA_RANKS_MAX_WORKERS, default 2 (each task's matrix products already use every
    core; more threads mostly add memory)."""
    return _positive_int("LORA_RANKS_MAX_WORKERS", 2)


def visible_gpus() -> list[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES, else every device nvidia-smi would list)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch  # only in the flow process, never in a pool worker before pinning

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def pin_worker(gpu_ids: tuple[str, ...], threads: int) -> None:
    """Process-pool initializer: give this worker one GPU (round robin over ``gpu_ids``) and a CPU thread budget,
    before torch is imported, so parallel SVD tasks neither share a device nor oversubscribe cores."""
    identity = multiprocessing.current_process()._identity  # (k,) for the k-th worker this pool started
    index = (identity[0] - 1) if identity else 0
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[index % len(gpu_ids)]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def task_runner():
    """The task runner named by LORA_RANKS_TASK_RUNNER (see module docstring)."""
    kind = os.environ.get("LORA_RANKS_TASK_RUNNER", "threads")
    if kind not in RUNNERS:
        raise EnvironmentSettingError(f"LORA_RANKS_TASK_RUNNER must be one of {', '.join(RUNNERS)}, got {kind!r}")
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max_workers())
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        gpus = tuple(visible_gpus())
        workers = len(gpus) if gpus and "LORA_RANKS_MAX_WORKERS" not in os.environ else max_workers()
        threads = max(1, (os.cpu_count() or 1) // workers)
        return ProcessPoolTaskRunner(max_workers=workers, initializer=pin_worker, initargs=(gpus, threads))
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise EnvironmentSettingError("LORA_RANKS_TASK_RUNNER=dask needs the dask extra: pip install '.[dask]'") from exc
    address = os.environ.get("LORA_RANKS_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max_workers(), "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def described(what: str | type):
    """A pydantic ``Field`` whose description is a help text, or the first paragraph of a settings class's doc."""
    text = what if isinstance(what, str) else " ".join((what.__doc__ or "").split("\n\n")[0].split())
    return Field(description=text)


def documented(fn):
    """Append an ``Args:`` section built from the parameters' ``Annotated[..., described(...)]`` help texts to the
    flow function's docstring: Prefect 3.9 reads parameter descriptions for the UI form from the docstring (it
    drops those given in ``Annotated``), so each help text is still written once, where the parameter is."""
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = []
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            if getattr(meta, "description", None):
                lines.append(f"    {name}: {meta.description}")
    if lines:
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn
