"""Atomic file and folder writes.

Every output of the tool goes through these functions so that an interrupted run leaves either the previous
file or the complete new one, never a truncated file that looks valid: the bytes go to a temporary file in the
same folder, are flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows
when source and target share a file system).

Folders (checkpoints, adapters) cannot be renamed over a non-empty folder, so ``atomic_folder`` writes the new
folder beside the target under a name no user picks (``.NAME.lora-ranks-<id>.new``, with the tool's marker inside),
moves the old one aside (``.NAME.lora-ranks-<id>.old``), moves the new one in, then deletes the old one. A crash
between the two moves leaves both complete folders beside the target name; ``recover_folder``, run before the next
write of the same target, finishes the swap. It touches only folders that carry this tool's marker and the write's
id: a folder of the user's named ``.NAME.new`` or ``.NAME.old`` is never renamed, deleted or used, and opening a
missing input never recovers anything.

With ``overwrite``, a folder output is written *into* a folder that holds files of the user's (``outputs``): its
files replace only the tool's own earlier files, one atomic rename each.

Temporary files and staging folders in flight are registered (``abandon_pending``): an interrupted command removes
them before it exits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._atomic import UMASK, abandon_pending, register_pending, replace_file
from .errors import LoraRanksError, as_disk_full
from .outputs import (
    MARKER,
    OutputFolderError,
    check_replaceable,
    file_stats,
    folder_marker,
    foreign_files,
    note_made,
    note_written,
    read_marker,
    tool_files,
)

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_folder",
           "recover_folder", "interrupted_copy", "abandon_pending", "strict_json_loads"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``_atomic.replace_file(path, write)`` (``write(tmp_path)`` produces the file, which then replaces ``path`` in
    one rename; on any exception the target is untouched; ``DiskFullError`` on a full disk), with the file noted in
    its run folder's marker (``outputs.note_made`` before, ``outputs.note_written`` after)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    note_made(target)  # in a folder of the user's written into with --overwrite: the run's name is the tool's now
    replace_file(target, write)
    note_written(target)  # listed in its run folder's marker at once (a run killed outright leaves the list)
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-order-preserving JSON to ``path`` atomically.

    NaN and infinity are refused (``allow_nan=False``): they are not JSON and other tools choke on them.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (Python's json accepts them; JSON, and other tools, do not).

    Raises:
        ValueError (``json.JSONDecodeError`` for malformed text): naming the problem.
    """
    return json.loads(text, parse_constant=_no_constant)


# -- folders ---------------------------------------------------------------------------------------------------------

_TAG = "lora-ranks-"  # in every name the tool gives a folder beside a target: .NAME.lora-ranks-<id>.new / .old


def _journal_entry(swap_id: str) -> Path:
    """Where the tool notes a folder write it began: ``$LORA_RANKS_CACHE/swaps/<id>.json`` (default
    ``~/.cache/lora-ranks``). Recovery touches a folder named like a staging or aside one only if its write id is
    noted there for that very target: a folder a user made, even with a copied marker, is never the tool's."""
    root = os.environ.get("LORA_RANKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-ranks")
    return Path(root) / "swaps" / f"{swap_id}.json"


def _journal_add(swap_id: str, target: Path) -> None:
    entry = _journal_entry(swap_id)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"target": str(target)}) + "\n")
    except OSError as exc:
        raise LoraRanksError(f"the tool's cache folder {entry.parent} cannot be written ({exc.strerror or exc}): "
                             "set LORA_RANKS_CACHE to a folder of yours") from None


def _journal_drop(swap_id: str) -> None:
    try:
        _journal_entry(swap_id).unlink(missing_ok=True)
    except OSError:
        pass  # a stale note only makes recovery consider a folder that then fails the marker check or is gone


def _journaled(swap_id: str, target: Path) -> bool:
    """The tool began write ``swap_id`` of ``target`` (its note is in the cache)."""
    try:
        return json.loads(_journal_entry(swap_id).read_text()).get("target") == str(target)
    except (OSError, ValueError, AttributeError):
        return False


def _staging(target: Path, swap_id: str) -> Path:
    return target.with_name(f".{target.name}.{_TAG}{swap_id}.new")


def _aside(target: Path, swap_id: str) -> Path:
    return target.with_name(f".{target.name}.{_TAG}{swap_id}.old")


def _swaps(target: Path, suffix: str) -> Iterator[tuple[Path, str]]:
    """The folders beside ``target`` named like this tool's staging (``.new``) or aside (``.old``) folders of it,
    with the write id their name carries."""
    prefix = f".{target.name}.{_TAG}"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(suffix) and entry.is_dir() and not entry.is_symlink():
            yield entry, entry.name[len(prefix):-len(suffix)]


def _swap_id_of(folder: Path) -> str | None:
    marker = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    return marker.get("swap_id") if marker is not None and marker["kind"] in ("folder", "staging") else None


def _complete(staging: Path, swap_id: str) -> bool:
    """A staging folder of write ``swap_id`` whose block finished (its marker is the folder output's, not staging's)."""
    marker = read_marker(staging)
    return marker is not None and marker["kind"] == "folder" and marker.get("swap_id") == swap_id


def interrupted_copy(path: str | os.PathLike) -> Path | None:
    """The complete new copy of ``path`` that a crash left beside it between the two renames of ``atomic_folder``
    (None when there is none): what the message about a missing folder can point to. Nothing is moved."""
    target = Path(os.path.abspath(path))
    for staging, swap_id in _swaps(target, ".new"):
        if _complete(staging, swap_id) and _journaled(swap_id, target):
            return staging
    return None


def recover_folder(path: str | os.PathLike) -> None:
    """Finish or clean up an ``atomic_folder`` swap of ``path`` that a crash interrupted; a no-op when there is none.
    Only folders named by this tool's scheme, carrying its marker with the same write id, *and* whose write the
    tool noted in its cache for this target (``_journal_entry``) are touched.

    * a complete staging folder, its aside folder, and no target: the crash came between the two renames, so the new
      folder is moved in;
    * an aside folder whose write id the target's marker carries: the crash came before the old folder was deleted:
      delete it;
    * a staging folder that did not move in (incomplete, or superseded): its write did not finish: delete it.
    """
    target = Path(os.path.abspath(path))
    for staging, swap_id in list(_swaps(target, ".new")):
        if _swap_id_of(staging) != swap_id or not _journaled(swap_id, target):
            continue  # not a folder this tool is writing: never touched
        if _complete(staging, swap_id) and not target.exists() and _aside(target, swap_id).is_dir():
            os.rename(staging, target)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            if not _aside(target, swap_id).is_dir():
                _journal_drop(swap_id)
    for aside, swap_id in list(_swaps(target, ".old")):
        if target.is_dir() and _swap_id_of(target) == swap_id and _journaled(swap_id, target):
            shutil.rmtree(aside, ignore_errors=True)
            _journal_drop(swap_id)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, content: str = "folder") -> Iterator[Path]:
    """Write a folder output at ``path`` that appears only once complete.

    Yields a fresh staging folder beside ``path`` to write into. If the block raises, the staging folder is deleted
    and ``path`` is untouched. When it ends without an exception:

    * ``path`` absent, empty, or holding only the tool's own files (its marker lists them): the old folder (if any)
      is renamed aside, the staging folder renamed to ``path``, and the old one deleted; at every instant the
      complete old or the complete new folder exists (see ``recover_folder``);
    * ``path`` holding files of the user's (only with ``overwrite``): the new files are renamed in one by one,
      replacing only the tool's earlier files, and the tool's earlier files the new output lacks are deleted; a file
      of the user's the output would replace is refused by name, and none is ever touched.

    What is written over is checked before the block runs (``outputs.check_replaceable``). The folder carries the
    marker (``outputs.MARKER``: ``content``, what it holds, and the files the tool wrote), so a later write of the
    same content may replace them.

    Raises:
        OutputFolderError: ``path`` is a file, a link, or a folder of the user's (without ``overwrite``), or holds a
            file of the user's the output would replace.
        DiskFullError: the file system ran out of space while the folder was written (nothing half-written is kept).
    """
    target = Path(os.path.abspath(path))
    check_replaceable(target, overwrite, content)
    target.parent.mkdir(parents=True, exist_ok=True)
    note_made(target)  # in a folder of the user's written into with --overwrite: the run's name is the tool's now
    recover_folder(target)
    swap_id = secrets.token_hex(6)
    staging, aside = _staging(target, swap_id), _aside(target, swap_id)
    _journal_add(swap_id, target)  # before the folder exists: every staging folder of the tool's is noted
    staging.mkdir()
    register_pending(staging, True)
    try:
        atomic_write_text(staging / MARKER, json.dumps({"kind": "staging", "made_by": "lora-ranks",
                                                        "swap_id": swap_id}) + "\n")
        yield staging
        _shared_modes(staging)
        atomic_write_text(staging / MARKER, folder_marker(staging, content, swap_id=swap_id))
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        register_pending(staging, False)
        _journal_drop(swap_id)
        full = as_disk_full(exc, target)
        if full is not None:
            raise full from None
        raise
    keep = foreign_files(target)
    if keep:  # overwrite was given (check_replaceable refused otherwise): write into it, keeping them
        try:
            _merge_into(staging, target, keep, content, swap_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            register_pending(staging, False)
            _journal_drop(swap_id)
        return
    register_pending(staging, False)  # complete: from here a crash leaves it to recover_folder, which moves it in
    if target.exists():
        os.rename(target, aside)  # step 1: the old folder aside
    os.rename(staging, target)  # step 2: the new folder in
    shutil.rmtree(aside, ignore_errors=True)  # step 3: the old folder gone
    _journal_drop(swap_id)


def _shared_modes(folder: Path) -> None:
    """Files a writer created 0o600 (safetensors' save_file, through save_pretrained) get the usual 0o666 & ~umask,
    like every other output."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            os.chmod(path, 0o666 & ~UMASK)


def _merge_into(staging: Path, target: Path, keep: list[str], content: str, swap_id: str) -> None:
    """Move the files of the complete ``staging`` folder into ``target``, which holds the user's files ``keep``
    (relative paths): replace only the tool's earlier files, delete those of them the new output lacks.

    Raises:
        OutputFolderError: a new file would replace, or lie under, a file of the user's (nothing is moved then).
    """
    new = read_marker(staging)["files"]
    yours = set(keep)
    clashes = sorted({f for f in new if f in yours or (target / f).is_dir()
                      or any(str(parent) in yours for parent in Path(f).parents if str(parent) != ".")})
    if clashes:
        raise OutputFolderError(f"{target} holds {', '.join(clashes[:3])}, which this tool did not write and the "
                                f"{content} would replace: --overwrite never replaces a file this tool did not "
                                "write: move them or choose another folder")
    earlier = tool_files(target)  # the tool's files there, still as it wrote them
    # While files move, the marker lists both sets: a crash leaves every file of the tool's listed as its own (a
    # renamed file keeps its size and modification time).
    atomic_write_text(target / MARKER, folder_marker(target, content, files={**earlier, **new}, swap_id=swap_id))
    for name in new:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target / name)
    for name in sorted(earlier.keys() - new.keys() - yours):
        stale = target / name
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
        for parent in stale.parents:  # folders the stale file leaves empty
            if parent == target or any(parent.iterdir()):
                break
            parent.rmdir()
    atomic_write_text(target / MARKER, folder_marker(target, content, files=file_stats(target, new), swap_id=swap_id))
