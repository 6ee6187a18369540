"""A run folder's life: claimed before the run (``claim_output_dir``), every document noted as it is written
(``note_written``, ``note_made``), and its list closed when the run ends (``record_made_entries``)."""

from __future__ import annotations

import os
from pathlib import Path

from .checks import RUN_ENTRIES, Inputs, check_output_dir
from .markers import (
    _DOCUMENTS,
    MARKER,
    _files_under,
    _folder_lock,
    _run_files,
    _write_marker,
    file_stats,
    read_marker,
)

__all__ = ["claim_output_dir", "note_written", "note_made", "record_made_entries"]


def claim_output_dir(path: str | os.PathLike, made_by: str, *, inputs: Inputs = (), overwrite: bool = False) -> Path:
    """``check_output_dir`` for the run folder of flow ``made_by``, then create it. A folder that was absent or empty
    gets the run marker (later runs, resumes and reruns into it need no ``overwrite``). A non-empty folder of the
    user's written into with ``overwrite`` gets a "foreign" marker and stays the user's: the names of the layout this
    run may make there are ``pending`` until ``record_made_entries`` (when the run ends) lists those it made as the
    tool's ``entries``; a name the user creates afterwards is never taken for the tool's. Returns the folder."""
    entries = RUN_ENTRIES[made_by]
    out = check_output_dir(path, inputs=inputs, overwrite=overwrite, entries=entries)
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    marker = read_marker(out)
    if marker is None:  # a new marker inside a folder of the user's written into with overwrite: its name is the tool's
        note_made(out)
    # The marker's list of documents (``files``) is kept up to date while the run writes (``note_written``): a run
    # killed outright leaves the list of what it wrote, and what the user adds afterwards stays theirs.
    if fresh:
        _write_marker(out, {"kind": "run", "made_by": made_by, "files": {}})
    elif marker is not None and marker["kind"] == "run" and not isinstance(marker.get("files"), dict):
        _write_marker(out, {**marker, "files": {}})  # it holds no document (checked above): nothing to list yet
    elif marker is None or marker["kind"] == "foreign":  # a folder of the user's written into with overwrite
        made = [e for e in (marker or {}).get("entries", ()) if (out / e).exists() or (out / e).is_symlink()]
        pending = [e for e in entries if e not in made and not ((out / e).exists() or (out / e).is_symlink())]
        files = (marker or {}).get("files")
        _write_marker(out, {"kind": "foreign", "made_by": made_by, "entries": made, "pending": pending,
                            "files": files if isinstance(files, dict) else {}})
    return out


def note_written(path: str | os.PathLike) -> None:
    """Record a document (``_DOCUMENTS``) the tool has just written, or every document under a folder it has just
    written, in the marker of the run folder holding it (the nearest folder above with a marker, when that is a run
    or a foreign one and the name is one of its run's): its size and modification time join the marker's ``files``
    at once, so that a run killed outright (SIGKILL, the OOM killer) still leaves the list of what it wrote, and a
    document added or edited afterwards is the user's. ``_io.atomic_write`` calls it for every file it writes;
    cheap for anything else (a suffix check and a few stats). Also ``note_made``. Safe across threads and processes
    (a lock on the run folder)."""
    path = Path(os.path.abspath(path))
    if path.is_dir() and not path.is_symlink():
        docs = [path / n for n in _files_under(path) if Path(n).suffix.lower() in _DOCUMENTS]
    else:
        docs = [path] if path.name != MARKER and path.suffix.lower() in _DOCUMENTS else []
    _note(path, docs)


def note_made(path: str | os.PathLike) -> None:
    """The tool is about to write at ``path`` (a file or folder it creates) in a folder of the user's that a run of
    it writes into with ``--overwrite`` (a foreign marker): the run's top-level name holding ``path`` becomes one of
    the tool's ``entries`` now, not when the run ends, so a run killed outright can be rerun there. A no-op
    anywhere else."""
    _note(Path(os.path.abspath(path)), [])


def _note(path: Path, docs: list[Path]) -> None:
    for folder in path.parents:
        if not (folder / MARKER).exists():
            continue
        marker = read_marker(folder)
        if marker is None or marker["kind"] not in ("run", "foreign"):
            return  # inside a folder output (its own list), a staging folder, or a folder that is not the tool's
        top = path.relative_to(folder).parts[0]
        if not docs and not (marker["kind"] == "foreign" and top in marker.get("pending", ())):
            return
        with _folder_lock(folder):
            marker = read_marker(folder)  # again, under the lock: another writer may have changed it
            if marker is None or marker["kind"] not in ("run", "foreign"):
                return
            update = dict(marker)
            if marker["kind"] == "foreign":
                if top in marker.get("pending", ()):  # the tool makes it now: the tool's from here on
                    update["entries"] = sorted({*marker.get("entries", ()), top})
                    update["pending"] = [e for e in marker["pending"] if e != top]
                elif top not in marker.get("entries", ()):
                    return  # a name of the user's: never listed as the tool's
            relative = [str(n.relative_to(folder)) for n in docs]
            relative = [r for r in relative if (folder / r).is_file()
                        and not any((folder / p / MARKER).exists() for p in Path(r).parents if str(p) != ".")]
            files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
            update["files"] = {**files, **file_stats(folder, relative)}
            if update != marker:
                _write_marker(folder, update)
        return


def record_made_entries(path: str | os.PathLike) -> None:
    """When a run ends (completed, failed or interrupted): in a folder of the user's, list the pending names it made
    as the tool's, so that a later ``overwrite`` run may write them again (the rest stop being pending); in a run
    folder of the tool's or the user's, keep the list of the documents the run wrote (``files``, built as it wrote
    them: ``note_written``) for those still there, with the size and modification time the tool gave them, so that
    one edited since (even while the run went on) is the user's: the next run refuses to write over it
    (``_run_folder_problem``). A no-op for anything else."""
    out = Path(path)
    marker = read_marker(out) if out.is_dir() else None
    if marker is None or marker["kind"] not in ("run", "foreign"):
        return
    with _folder_lock(out):  # a writer still noting a file (another thread or process) finishes first
        marker = read_marker(out)
        if marker is None or marker["kind"] not in ("run", "foreign"):
            return
        if marker["kind"] == "foreign":
            made = [e for e in marker.get("pending", ()) if (out / e).exists() or (out / e).is_symlink()]
            marker = {**marker, "entries": sorted({*marker.get("entries", ()), *made}), "pending": []}
        listed = marker.get("files")
        if isinstance(listed, dict):  # as the run wrote them (note_written): an edit made while it ran stays the user's
            marker["files"] = {name: stat for name, stat in listed.items() if (out / name).is_file()}
        else:
            marker["files"] = _run_files(out, None if marker["kind"] == "run" else marker["entries"])
        _write_marker(out, marker)
