"""Output folders that never take anything of the user's.

Two kinds of output, each checked in one line before anything is written:

* a **run folder** (``--out`` of demo, analyze, finetune, train, compare, check) is written *into*: only the
  top-level names of its flow's layout (``RUN_ENTRIES``) are written. It must be absent, empty, or a run folder of
  this tool (its marker says so). A non-empty folder of the user's is written into only with ``overwrite``, and
  even then none of the names the run writes may already be there unless an earlier run of this tool made them
  (the marker lists them): ``overwrite`` never replaces a file the tool did not write. Such a folder stays the
  user's (marker kind "foreign"): the next run asks again.
* a **folder output** (an adapter, an export, a model folder: ``_io.atomic_folder``) *replaces* its target whole
  when the target is absent, empty, or a folder output of this tool holding nothing but what the tool wrote (its
  marker lists the files). With ``overwrite`` it is also written into a folder that holds other files, the way
  ``save_pretrained`` writes: its files replace only the tool's own earlier files (by the marker's list); a file
  of the user's is never replaced, deleted or moved, and one the output would replace is refused by name.

Never, even with ``overwrite``: an output that is a file, a symbolic link (for folder outputs; a dangling one for
run folders), lies under a file, cannot be written, or is, contains or lies inside an input of the command (each
path compared as given and as resolved, so a link cannot hide one inside the other); a folder output into a run
folder, or a run into an adapter or model folder of this tool.

The marker is the file ``.lora-ranks`` (JSON: ``kind``, ``made_by``; "run" for a run folder the tool created,
"foreign" with the ``entries`` the tool made in a folder of the user's, "folder" with the ``content`` and the
``files`` of a folder output, "staging" in a folder output being written). A folder is the tool's only if its marker
says so: a folder that merely looks like an output of this tool (the same file names, an old layout) is the user's.

Run and foreign markers also list the documents (``_DOCUMENTS``: configs, reports, tables) the run wrote, with their
size and modification time (``files``), each added as it is written (``note_written``, called by every atomic
write), so a run killed outright leaves its list: a document edited or added since is the user's, and the next run
is refused. A run marker without that list (an earlier release's, or one made by hand) cannot tell the tool's
documents from the user's: a run into a folder holding any is refused. A folder marker that describes none of its
folder's files (``_describes_its_files``) is a file of the user's and is never rewritten.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraRanksError

__all__ = ["OutputFolderError", "MARKER", "RUN_ENTRIES", "check_output_dir", "claim_output_dir",
           "check_replaceable", "record_made_entries", "note_written", "note_made", "folder_marker", "file_stats",
           "read_marker", "tool_files", "foreign_files", "local_path"]

#: The marker file every output folder of this tool carries.
MARKER = ".lora-ranks"
#: Marker kinds the tool writes (anything else reads as "invalid": the folder is not the tool's).
_KINDS = ("run", "folder", "foreign", "staging")
#: The top-level names each flow writes into its run folder: what its layout names (``OutputLayout``,
#: ``TrainLayout``, ``ComparisonLayout``, the check's report; ``tests/test_outputs.py`` checks every path they give
#: lies under one of these). In a folder of the user's, ``overwrite`` writes only names absent or made by the tool.
RUN_ENTRIES: dict[str, tuple[str, ...]] = {
    "svd-analysis": ("demo_inputs", "saved_models", "configs", "analysis_outputs", "train"),
    "preliminary-finetune": ("demo_inputs", "saved_models"),
    "train-dynamic-lora": ("adapter", "training_metrics.json", "warm_start_adapter"),
    "compare-allocations": ("data", "demo_inputs", "analysis", "warm", "configs", "runs", "allocation_fidelity.json",
                            "sensitivity.json", "sensitivity.png", "results.json", "comparison.png", "curves.png"),
    "check-config": ("check_report.json",),
}
#: The names of the files each kind of folder output holds: a file of the user's with one of these names would be
#: replaced by the output, so ``overwrite`` refuses it before any work (the swap checks every file again).
_OUTPUT_FILES = {
    "adapter": re.compile(r"adapter_config\.json|adapter_model\.safetensors|README\.md|lora_rank_config\.json|"
                          r"lora_ranks_adapter\.json|extraction_report\.json|export_report\.json"),
    "model": re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                        r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|"
                        r"special_tokens_map\.json|chat_template\.(jinja|json)|vocab\.json|merges\.txt|added_tokens\.json|"
                        r"(video_)?preprocessor_config\.json|processor_config\.json|export_report\.json|"
                        r"base_provenance\.json|training_metrics\.json|pretraining\.json"),
}

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


class OutputFolderError(LoraRanksError):
    """An output path that would overwrite or take something of the user's (named in the message)."""


def local_path(value: str | os.PathLike | None) -> Path | None:
    """``value`` as an absolute path when it names something on this machine; None for hub ids and the demo's
    built-in names (nothing local to protect)."""
    if value is None or str(value) == "" or str(value).startswith("demo:"):
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path  # not normalized: "link/.." means what the file system says, not what the text says
    return path if path.exists() or path.is_symlink() else None


def _spellings(path: Path) -> set[Path]:
    """A path as given (absolute, ``..`` folded as text) and resolved (links followed, ``..`` after them): a link
    makes them differ, and either may be the one that meets another path."""
    return {Path(os.path.abspath(path)), _resolved(path)}


def _resolved(path: Path) -> Path:
    """``path`` with its links followed; a loop of links resolves to nothing, so it stands as given (the command that
    opens it names the loop)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


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


def _is_run_folder(folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker["kind"] == "run"


def _overlap(out: Path, inputs: Inputs) -> str | None:
    """How ``out`` collides with an input, as a sentence; None when it does not."""
    outs = _spellings(out)
    for name, value in inputs:
        given = local_path(value)
        if given is None:
            continue
        for o in outs:
            for i in _spellings(given):
                real = _resolved(given)
                if o == i:
                    return f"is {name} ({real}), an input of this command"
                if i.is_relative_to(o):
                    return f"contains {name} ({real}), an input of this command"
                if o.is_relative_to(i):
                    return f"lies inside {name} ({real}), an input of this command"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _path_problem(out: Path, inputs: Inputs, *, folder_output: bool) -> str | None:
    """What makes ``out`` unusable whatever ``overwrite`` says, as a sentence; None when nothing does."""
    if str(out) in ("", "."):
        if folder_output:
            return "is the current folder: name a folder for the output"
    elif folder_output and Path.cwd().is_relative_to(Path(os.path.abspath(out))):
        return "is, or holds, the current folder: name another folder for the output"
    collision = _overlap(out, inputs)
    if collision:
        return f"{collision}: choose another output folder"
    if out.is_symlink():
        target = os.readlink(out)
        if not out.exists():
            return f"is a symbolic link to {target}, which does not exist"
        if folder_output:
            return f"is a symbolic link (to {target}): give the folder itself, not a link to it"
    if out.exists() and not out.is_dir():
        return "is a file, not a folder: choose a folder (new or empty) for the outputs"
    for parent in Path(os.path.abspath(out)).parents:  # writing under it would create the link's target
        if parent.is_symlink() and not parent.exists():
            return f"lies under {parent}, a symbolic link to {os.readlink(parent)}, which does not exist"
    existing = _nearest_existing(out)
    if not existing.is_dir():
        return f"lies under {existing}, which is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK) or not probe_writable(existing):
        return f"cannot be written: no folder can be created in {existing}"
    if folder_output:  # written beside itself first, as .NAME.lora-ranks-<12 hex>.new: that name must fit too
        longest = os.pathconf(existing, "PC_NAME_MAX") - len(".lora-ranks-123456789abc.new") - 1
        if len(os.fsencode(Path(os.path.abspath(out)).name)) > longest:
            return f"has a name too long for this tool's temporary copy beside it: at most {longest} bytes here"
    return None


_KEEP_YOURS = "--overwrite never replaces a file this tool did not write: move them or choose another folder"


def _replace_problem(target: Path, content: str, overwrite: bool) -> str | None:
    """Why writing a folder output of ``content`` at the existing folder ``target`` would take something of the
    user's, as a sentence; None when it would not (module docstring)."""
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    marker = read_marker(target)
    kind = marker["kind"] if marker else None
    if kind == "run":
        return "holds a run of this tool: an adapter or model is never written into a run folder; choose another folder"
    if kind == "foreign":
        return "is a folder of yours that a run of this tool wrote into: choose another folder for an adapter or model"
    if kind in ("invalid", "staging"):
        return f"holds a {MARKER} file this tool did not write: choose another folder"
    if kind == "folder" and not _describes_its_files(target, marker):
        listed = marker["files"]
        why = ("it lists names only (release 0.3.0 or earlier), so this tool cannot tell its files from yours"
               if isinstance(listed, list) else
               "none of the files it lists is there as this tool wrote it (copied or edited by hand?)")
        return (f"holds a {MARKER} file that does not describe its files: {why}; writing there would replace that "
                "file: choose another folder, or move what you want to keep out of this one first")
    if kind == "folder" and marker.get("content", "folder") != content and not overwrite:
        held = marker.get("content", "folder")
        return (f"holds {_a(held)} {held} folder of this tool, which this command would replace with {_a(content)} "
                f"{content}: choose a new or empty folder, or pass --overwrite to replace it")
    yours = foreign_files(target)
    if not yours:
        return None
    if not overwrite:
        what = (f"holds {len(yours)} file(s) this tool did not write, or changed since it wrote them ({_shown(yours)})"
                if kind == "folder" else
                f"is a folder this tool did not write, holding {_entries(len(entries))} ({_shown(entries)})")
        return (f"{what}: choose a new or empty folder, or pass --overwrite to write the {content}'s files into it "
                "(your files stay)")
    names = _OUTPUT_FILES.get(content)  # another content's names are not known here: the swap checks them
    clashes = [f for f in yours if "/" not in f and names is not None and names.fullmatch(f)]
    if clashes:
        return f"holds {_shown(clashes)}, which this tool did not write and the {content} would replace: {_KEEP_YOURS}"
    return None


def _describes_its_files(folder: Path, marker: dict) -> bool:
    """Whether a folder marker is this tool's own record of ``folder``: at least one file it lists is there as the
    tool wrote it, or the folder holds nothing else (a marker that matches none of its files was copied or forged,
    and the file ``.lora-ranks`` is then the user's like any other)."""
    return bool(tool_files(folder)) or not _files_under(folder)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _links_inside(folder: Path) -> list[str]:
    """Symbolic links anywhere under ``folder`` (not followed): writes into a run folder would follow them out."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [str(Path(root, n).relative_to(folder)) for n in dirs + files if Path(root, n).is_symlink()]
    return sorted(found)


def _inner_problems(folder: Path) -> str | None:
    """A folder output inside a run folder that a rerun would replace but holds a file the tool did not write."""
    for marker_path in sorted(folder.rglob(MARKER)):
        inner = marker_path.parent
        marker = read_marker(inner)
        if inner == folder or marker is None:
            continue
        if marker["kind"] in ("run", "foreign"):  # a run folder inside (compare's analysis): the same checks
            problem = _run_documents_problem(inner, marker, prefix=f"{inner.relative_to(folder)}/")
            if problem:
                return problem
            continue
        if marker["kind"] != "folder":
            continue
        added = foreign_files(inner)
        if added:
            return (f"holds {inner}, which holds {len(added)} file(s) this tool did not write, or changed since it "
                    f"wrote them ({_shown(added)}): move them out of the run folder first")
    return None


def probe_writable(folder: Path) -> bool:
    """Whether a folder can be created in ``folder`` (root passes ``os.access`` on /proc and /sys too): one temporary
    folder made and removed."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lora-ranks-probe-", dir=folder))
    except OSError:
        return False
    return True


def _run_folder_problem(out: Path, overwrite: bool, entries: tuple[str, ...]) -> str | None:
    """Why a run writing ``entries`` into the existing folder ``out`` would take something of the user's."""
    present = sorted(p.name for p in out.iterdir())
    marker = read_marker(out)
    kind = marker["kind"] if marker else None
    problem = _run_documents_problem(out, marker) if kind in ("run", "foreign") else None
    if problem:
        return problem
    if not present or kind == "run":
        return None
    if kind == "folder":
        return "is an adapter or model folder of this tool: a run never writes into one; choose another folder"
    if kind in ("invalid", "staging"):
        return f"holds a {MARKER} file this tool did not write: choose another folder"
    if not overwrite:
        return (f"is a folder this tool did not write, holding {_entries(len(present))} ({_shown(present)}): choose a "
                "new or empty folder, or pass --overwrite to write the run's outputs into it (your files stay)")
    made = set(marker.get("entries", ())) if kind == "foreign" else set()
    clashes = [e for e in entries if e not in made and ((out / e).exists() or (out / e).is_symlink())]
    if clashes:
        return (f"holds {_shown(clashes)}, which this tool did not write (or a run that was killed did: it cannot "
                f"tell) and this run would write over: {_KEEP_YOURS}")
    return None


def _run_documents_problem(folder: Path, marker: dict, prefix: str = "") -> str | None:
    """Why a run into the run folder ``folder`` (its run or foreign ``marker``) would write over something of the
    user's, as a sentence (names shown with ``prefix``, the folder's path inside the command's output); None when
    it would not. A marker without its list of files cannot tell the tool's from the user's: every file under the
    run's names is then the user's. With the list, a document added or changed since the tool wrote it is."""
    names = None if marker["kind"] == "run" else marker.get("entries", ())
    if not isinstance(marker.get("files"), dict):
        unlisted = sorted(f"{prefix}{name}" for name in _run_contents(folder, names))
        if unlisted:
            return (f"holds {_shown(unlisted)}, which this tool cannot tell from files of yours: the {MARKER} of "
                    f"{prefix or 'the folder'} lists no files it wrote (a run of an earlier release, or a marker copied "
                    "or made by hand), and a run writes over its files: move them out of the folder, or choose another "
                    "folder (even --overwrite never replaces them)")
        return None
    edited = [f"{prefix}{name}" for name in _edited_run_files(folder, marker)]
    if edited:
        return (f"holds {_shown(edited)}, which you added or changed after this tool's last run there: a run writes over "
                "its files: copy them elsewhere first, or choose another folder (even --overwrite never replaces them)")
    return None


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


def check_output_dir(path: str | os.PathLike, *, inputs: Inputs = (), overwrite: bool = False,
                     folder_output: bool = False, folder_content: str = "adapter", flag: str = "--out",
                     entries: tuple[str, ...] = ()) -> Path:
    """Refuse an output that would take anything of the user's (module docstring); returns it resolved.

    Args:
        path: the output folder.
        inputs: ``(flag, path)`` of each input of the command (hub ids and unset ones are skipped).
        overwrite: write a run's outputs, or a folder output's files, into a folder that holds files of the user's
            (never replacing one of them).
        folder_output: the output is a folder output (an adapter, an export, a model) rather than a run folder.
        folder_content: what a folder output holds ("adapter", "model").
        flag: how the output is named in messages.
        entries: the top-level names a run writes (``RUN_ENTRIES`` of its flow).

    Raises:
        OutputFolderError: naming the output, what is wrong, and the way to proceed.
    """
    given = Path(path)  # as the writers take it: a quoted ~ is a folder named ~
    shown = Path(os.path.abspath(given))  # as given (a link is named as the link, not its target)
    try:
        problem = _path_problem(given, list(inputs), folder_output=folder_output)
        out = given.resolve()
        if problem is None and out.is_dir():
            if folder_output:
                problem = _replace_problem(out, folder_content, overwrite)
            else:
                links = _links_inside(out)
                problem = (f"holds symbolic links ({_shown(links)}) that writes would follow out of it: remove them"
                           if links else _run_folder_problem(out, overwrite, entries) or _inner_problems(out))
    except (OSError, RuntimeError) as exc:  # a name too long, a path that cannot be listed, a loop of links
        raise OutputFolderError(f"{flag} {shown} cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
    if problem:
        raise OutputFolderError(f"{flag} {shown} {problem}")
    return out


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


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself), between threads and processes alike."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_DOCUMENTS = {".json", ".jsonl", ".md", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".html"}
"""The run files a user may edit by hand (configs, reports, tables): a run protects them once edited. Binary data
(weights, factor files, plots) is the tool's to check and recompute: a damaged cache file is collected again."""


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
    from ._io import atomic_write_text

    atomic_write_text(folder / MARKER, json.dumps(marker) + "\n")


def check_replaceable(path: str | os.PathLike, overwrite: bool = False, content: str = "folder") -> None:
    """Refuse to write a folder output at ``path`` when it would take something of the user's (module docstring):
    what ``_io.atomic_folder`` checks before its block runs.

    Raises:
        OutputFolderError: naming the target and what it holds.
    """
    target = Path(path)
    problem = _path_problem(target, (), folder_output=True)
    if problem is None and target.is_dir():
        problem = _replace_problem(target, content, overwrite)
    if problem:
        raise OutputFolderError(f"{Path(os.path.abspath(target))} {problem}")
