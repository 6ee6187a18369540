"""Cached tasks whose results point at files: a cached result whose files are gone or changed since is computed
again, once, with a warning (the one place that rule is written).

A persisted result of ``collect-curvature``, ``analyze-layer``, ``split-half-finetunes`` or ``allocation-fidelity``
names files on disk (factor files, layer files, model folders, a fidelity table). Prefect serves it from its cache
by the task's inputs; it cannot know that a user deleted or edited those files since. ``run_cached`` and
``map_cached`` run the task, ask ``is_current`` of each result, and rerun the stale ones with
``refresh_cache=True``. The content identities their cache keys are made of are here too (``file_digest``,
``folder_digest``, ``code_identity``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, unmapped
from prefect.futures import as_completed

__all__ = ["run_cached", "map_cached", "file_digest", "folder_digest", "code_identity"]


def run_cached(task: Task, is_current: Callable[[Any], bool], stale_warning: str, *, refresh: bool = False,
               **kwargs: Any) -> Any:
    """``task(**kwargs)``'s result (``refresh``: recomputed, not read from the cache); a cached one that is no longer
    current is computed again after logging ``stale_warning``."""
    state = (task.with_options(refresh_cache=True) if refresh else task)(**kwargs, return_state=True)
    result = state.result()
    # Only a cached result can point at files changed since; a fresh one was checked as it was written.
    if state.name == "Cached" and not is_current(result):
        get_run_logger().warning(stale_warning)
        result = task.with_options(refresh_cache=True)(**kwargs)
    return result


def map_cached(task: Task, is_current: Callable[[Any], bool], stale_warning: str, mapped: dict[str, Sequence],
               shared: dict[str, Any], *, refresh: bool = False,
               on_done: Callable[[int], None] | None = None) -> list:
    """``task.map`` over ``mapped`` (argument -> one value per run) with ``shared`` arguments, in the order of
    ``mapped``; ``on_done(n)`` after each of the n runs that finish (progress). Results no longer current are computed
    again after logging ``stale_warning`` (``{n}``: how many)."""
    fixed = {name: unmapped(value) for name, value in shared.items()}
    futures = (task.with_options(refresh_cache=True) if refresh else task).map(**mapped, **fixed)
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()  # the first failure ends the flow here, not after every layer finished
        if on_done is not None:
            on_done(done)
    results = [future.result() for future in futures]
    stale = [i for i, result in enumerate(results) if not is_current(result)]
    if stale:
        get_run_logger().warning(stale_warning.format(n=len(stale)))
        again = task.with_options(refresh_cache=True).map(
            **{name: [values[i] for i in stale] for name, values in mapped.items()}, **fixed)
        for i, result in zip(stale, again.result()):
            results[i] = result
    return results


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of a folder's files (not recursive): a model folder's content identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def code_identity(seed: str, modules: Sequence[Any]) -> str:
    """sha256 of ``seed`` (a version, or the numerics identity) and the source of ``modules``: any edit of the code
    that computes a cached result changes its key."""
    digest = hashlib.sha256(seed.encode())
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()
