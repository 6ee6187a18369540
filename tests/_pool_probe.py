"""What a process-pool worker reports about itself, in a module of its own: a spawned worker imports the module of
the function it runs, and this one imports nothing heavy (the test modules import torch: ~8 CPU-seconds a worker)."""

import os


def worker_env(_):
    """(pid, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) of the worker process that runs it."""
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")
