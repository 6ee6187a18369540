"""CPU parallelism for spectra: a layer's matrices side by side, each with a share of the BLAS threads.

Process-wide state lives here, and only here: the BLAS thread limit shared by concurrently analyzed layers
and the long-lived worker pools. Both are reset in a forked child, which has none of the parent's threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

from .spectrum import default_device

__all__ = ["parallel_plan", "blas_threads", "spectra_pool"]


def parallel_plan(jobs: int, device: torch.device | str | None = None, max_workers: int = 4) -> tuple[int, int]:
    """How to run ``jobs`` independent spectra at once: (concurrent workers, BLAS threads per worker).

    On the CPU, several matrices computed side by side with single- or few-threaded BLAS beat one matrix
    at a time with all threads: LAPACK's tridiagonal reduction (half of it matrix-vector products) scales
    poorly over threads (measured on 2 cores: 30% less wall time for a layer's 7 spectra). The thread
    budget is ``torch.get_num_threads()`` (what the process runner pins per worker); ``max_workers``
    bounds the memory held at once (each worker holds one float64 delta and its Gram matrix, ~0.65 GB
    at 18944x3584). On CUDA one worker: the device serializes the kernels anyway.
    """
    dev = torch.device(device) if device is not None else default_device()
    budget = max(1, torch.get_num_threads())
    if dev.type != "cpu" or jobs <= 1 or budget == 1:
        return 1, budget
    workers = max(1, min(jobs, budget, max_workers))
    return workers, max(1, budget // workers)


_BLAS_LOCK = threading.Lock()
_BLAS_STATE: dict = {"users": 0, "limiter": None}


def _reset_blas_state_after_fork() -> None:  # a forked child has none of the parent's threads in the block
    global _BLAS_LOCK
    _BLAS_LOCK = threading.Lock()
    _BLAS_STATE.update(users=0, limiter=None)


os.register_at_fork(after_in_child=_reset_blas_state_after_fork)


@contextmanager
def blas_threads(threads: int):
    """Limit NumPy's BLAS/LAPACK to ``threads`` threads (threadpoolctl) while the block runs.

    The limit is process-wide, and layers may run concurrently in threads (Prefect's thread runner): the
    first caller sets it, the last one out restores the original, so an early finisher cannot lift it
    under a running layer, nor a late one leave it set after the run.
    """


    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            _BLAS_STATE["limiter"] = threadpool_limits(limits=threads, user_api="blas")
        _BLAS_STATE["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:  # a forked child has none of the parent's threads (or lock holders)
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def spectra_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per size: reused threads keep reusing their malloc arenas, so peak memory stays flat
    over layers (a fresh pool per layer grew it by ~60 MB between 8 and 32 layers)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="spectra")
        return _POOLS[workers]
