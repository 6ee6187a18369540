"""The marker file ``.lora-ranks`` (see the package docstring): reading and writing it, the files a folder output's
marker lists, and the documents a run folder's marker lists."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .._atomic import replace_file
import fcntl

__all__ = ["MARKER", "read_marker", "file_stats", "folder_marker", "tool_files", "foreign_files"]


#: The marker file every output folder of this tool carries.
MARKER = ".lora-ranks"


#: Marker kinds the tool writes (anything else reads as "invalid": the folder is not the tool's).
_KINDS = ("run", "folder", "foreign", "staging")


_DOCUMENTS = {".json", ".jsonl", ".md", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".html"}
"""The run files a user may edit by hand (configs, reports, tables): a run protects them once edited. Binary data
(weights, factor files, plots) is the tool's to check and recompute: a damaged cache file is collected again."""


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder`` (module docstring): a dict with ``kind`` and ``made_by``. None when it has none; a
    marker that is not one the tool writes reads as ``{"kind": "invalid"}`` (the folder is then not the tool's)."""
    path = Path(folder) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():  # the tool writes a plain file, never a folder or a link
        return {"kind": "invalid"}
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"kind": "invalid"}

    def names(key: str, *, top_level: bool = False) -> bool:  # inside the folder: no "..", nothing absolute
        value = marker.get(key, [])
        listed = value.keys() if isinstance(value, dict) else value
        return isinstance(value, (list, dict)) and all(_inside(f) and not (top_level and "/" in f) for f in listed) \
            and (not isinstance(value, dict) or all(_is_stat(v) for v in value.values()))

    valid = (isinstance(marker, dict) and marker.get("kind") in _KINDS and isinstance(marker.get("made_by", ""), str)
             and (marker["kind"] != "folder" or ("files" in marker and names("files")))
             and (marker["kind"] != "foreign" or (names("entries", top_level=True)
                                                  and names("pending", top_level=True))))
    return marker if valid else {"kind": "invalid"}


def _inside(name: object) -> bool:
    """A path the marker may name: relative, normalized, without ".." (a marker is a file anyone can edit: one
    naming ../x or /x must not make the tool delete or replace it)."""
    return (isinstance(name, str) and name != "" and not name.startswith("/") and "\\" not in name
            and Path(name).as_posix() == name and ".." not in Path(name).parts)


def _is_stat(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)


def file_stats(folder: Path, names: Iterable[str]) -> dict[str, list[int]]:
    """``[size in bytes, modification time in ns]`` of each of ``names`` under ``folder`` (links not followed):
    what a folder marker records of each file the tool wrote, so that a file rewritten since (by a user, another
    tool, a later save_pretrained) is no longer the tool's."""
    stats = {}
    for name in names:
        info = os.lstat(folder / name)
        stats[name] = [info.st_size, info.st_mtime_ns]
    return stats


def folder_marker(folder: Path, content: str = "folder", made_by: str = "lora-ranks", *,
                  files: dict[str, list[int]] | None = None, swap_id: str | None = None) -> str:
    """The marker text of a folder output: what it holds (``content``: "adapter", "model", ...) and every file the
    tool wrote in it with its size and modification time (``files``, from ``file_stats``; default: every file now in
    ``folder``), so that a later write can tell the tool's files, as it wrote them, from the user's; ``swap_id`` names
    the write that made it (``_io.recover_folder`` reads it)."""
    listed = files if files is not None else file_stats(folder, _files_under(folder))
    marker = {"kind": "folder", "content": content, "made_by": made_by, "files": dict(sorted(listed.items()))}
    return json.dumps({**marker, **({"swap_id": swap_id} if swap_id else {})}) + "\n"


def _files_under(folder: Path) -> list[str]:
    """Every file and link under ``folder`` (links not followed), relative, but the marker."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [str(Path(root, n).relative_to(folder)) for n in files + [d for d in dirs if Path(root, d).is_symlink()]]
    return sorted(f for f in found if f != MARKER)


def tool_files(folder: str | os.PathLike) -> dict[str, list[int]]:
    """The files of ``folder`` that are the tool's: those its folder marker lists, still as the tool wrote them (same
    size and modification time). Relative path -> [size, mtime_ns]; empty for a folder without a folder marker, and
    for a marker of release 0.3.0 or earlier, which lists names only: a name cannot tell the tool's file from one
    rewritten since, so none of them is replaced."""
    folder = Path(folder)
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None or marker["kind"] != "folder" or isinstance(marker["files"], list):
        return {}
    listed = marker["files"]
    present = set(_files_under(folder))
    now = file_stats(folder, [f for f in listed if f in present])
    return {f: stat for f, stat in now.items() if stat == listed[f] and not (folder / f).is_symlink()}


def _empty_folders_under(folder: Path) -> list[str]:
    """Folders under ``folder`` that hold nothing at all, relative (a folder output never writes one: a user made
    it, and it is theirs like a file)."""
    found = []
    for root, dirs, _ in os.walk(folder):
        found += [str(Path(root, d).relative_to(folder)) for d in dirs
                  if not Path(root, d).is_symlink() and not any(Path(root, d).iterdir())]
    return found


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The files (and links) under ``folder`` that are not the tool's (``tool_files``): every one unless its marker
    is a folder output's, then those its list leaves out or that changed since the tool wrote them; and every
    empty folder (the tool's outputs have none: a user made it). Sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = tool_files(folder)
    return sorted([f for f in _files_under(folder) if f not in ours] + _empty_folders_under(folder))


def _describes_its_files(folder: Path, marker: dict) -> bool:
    """Whether a folder marker is this tool's own record of ``folder``: at least one file it lists is there as the
    tool wrote it, or the folder holds nothing else (a marker that matches none of its files was copied or forged,
    and the file ``.lora-ranks`` is then the user's like any other)."""
    return bool(tool_files(folder)) or not _files_under(folder)


def _run_files(out: Path, entries: Iterable[str] | None) -> dict[str, list[int]]:
    """Every document (``_DOCUMENTS``) a run's names hold now (``entries``; None: the whole folder but its marker),
    relative path -> ``[size, mtime_ns]``; links are not followed, and a folder output inside (its own marker)
    keeps its own list."""
    found: dict[str, list[int]] = {}
    for root in ([out] if entries is None else [out / e for e in entries]):
        if root.is_symlink() or not root.exists():
            continue
        if root.is_file():
            names = [str(root.relative_to(out))]
        else:
            names = []
            for dirpath, dirs, files in os.walk(root):
                dirs[:] = [d for d in dirs
                           if not Path(dirpath, d).is_symlink() and not (Path(dirpath, d) / MARKER).exists()]
                names += [str(Path(dirpath, n).relative_to(out)) for n in files]
        found.update(file_stats(out, [n for n in names if n != MARKER and Path(n).suffix.lower() in _DOCUMENTS]))
    return found


def _run_contents(out: Path, entries: Iterable[str] | None) -> list[str]:
    """Every file and link under a run's names in ``out`` (``entries``; None: the whole folder but its marker),
    relative; a folder with its own marker inside is left to its own checks."""
    found: list[str] = []
    for root in ([out] if entries is None else [out / e for e in entries]):
        if root.is_symlink() or root.is_file():
            found.append(str(root.relative_to(out)))
        elif root.is_dir():
            for dirpath, dirs, files in os.walk(root):
                dirs[:] = [d for d in dirs if not (Path(dirpath, d) / MARKER).exists() or Path(dirpath, d).is_symlink()]
                found += [str(Path(dirpath, n).relative_to(out)) for n in files
                          + [d for d in dirs if Path(dirpath, d).is_symlink()]]
    return sorted(f for f in found if f != MARKER)


def _edited_run_files(out: Path, marker: dict | None) -> list[str]:
    """Documents of the user's in a run folder whose last run recorded its own (``record_made_entries``): those it
    listed that changed since, and those it did not list (added since, e.g. a config under a name a finetune run
    never wrote). The list grows as a run writes (``note_written``), so a run killed outright leaves it too; a
    marker without one is refused whole (``_run_folder_problem``)."""
    listed = (marker or {}).get("files")
    if not isinstance(listed, dict):
        return []
    now = _run_files(out, None if marker["kind"] == "run" else marker.get("entries", ()))
    return sorted(name for name, stat in now.items() if listed.get(name) != stat)


def _write_marker(folder: Path, marker: dict) -> None:
    data = (json.dumps(marker) + "\n").encode("utf-8")
    replace_file(folder / MARKER, lambda tmp: Path(tmp).write_bytes(data))


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself), between threads and processes alike."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
