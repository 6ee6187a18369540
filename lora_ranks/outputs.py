"""Output folders that never take anything of the user's.

Two kinds of output, each refused in one line before anything is written:

* a **run folder** (``--out`` of demo, analyze, finetune, train, compare, check) is written *into*. It must be
  absent, empty, or a run folder of this tool; a non-empty folder of the user's is written into only with
  ``overwrite`` (and is not marked as the tool's: the next run asks again).
* a **folder output** (an adapter, an export, a model folder: ``_io.atomic_folder``) *replaces* its target whole.
  The target must be absent, empty, or a folder output of this tool holding nothing but what the tool wrote (its
  marker lists the files), unless ``overwrite``.

Never, even with ``overwrite``: an output that is a file, a symbolic link (for folder outputs; a dangling one for
run folders), lies under a file, cannot be written, or is, contains or lies inside an input of the command (each
path compared as given and as resolved, so a link cannot hide one inside the other).

The marker is the file ``.lora-ranks`` (JSON: ``kind`` "run" or "folder", ``made_by``, and for folders the
``files`` written). Outputs of releases before the marker (<= 0.2.0) are recognized by their layout
(``_RUN_SIGNATURES``, ``_FOLDER_SIGNATURES``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import LoraRanksError

__all__ = ["OutputFolderError", "MARKER", "check_output_dir", "claim_output_dir", "check_replaceable",
           "folder_marker", "read_marker", "local_path"]

#: The marker file every output folder of this tool carries.
MARKER = ".lora-ranks"
#: Paths by which run folders of releases before the marker are recognized.
_RUN_SIGNATURES = ("configs/lora_rank_config.json", "saved_models/preliminary_finetune", "analysis_outputs/svd",
                   "analysis/configs/lora_rank_config.json", "adapter/lora_ranks_adapter.json", "check_report.json")
#: Files by which adapter and export folders of releases before the marker are recognized.
_FOLDER_SIGNATURES = ("lora_ranks_adapter.json", "extraction_report.json", "export_report.json")

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
    return {Path(os.path.abspath(path)), path.resolve()}


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder``: ``kind`` ("run"; "folder" with ``content`` and ``files``; "foreign", a folder of
    the user's written into with ``overwrite``) and ``made_by``. None when it has none; a marker that is not one
    the tool writes reads as ``{"kind": "invalid"}`` (the folder is then not the tool's)."""
    path = Path(folder) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():  # the tool writes a plain file, never a folder or a link
        return {"kind": "invalid"}
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"kind": "invalid"}
    valid = (isinstance(marker, dict) and marker.get("kind") in ("run", "folder", "foreign")
             and isinstance(marker.get("made_by", ""), str)
             and (marker.get("kind") != "folder" or (isinstance(marker.get("files"), list)
                                                     and all(isinstance(f, str) for f in marker["files"]))))
    return marker if valid else {"kind": "invalid"}


def folder_marker(folder: Path, content: str = "folder", made_by: str = "lora-ranks") -> str:
    """The marker text of a folder output: what it holds (``content``: "adapter", "model", ...) and every file in
    it, so that a later replacement can tell whether something was added by hand or is of another kind."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    return json.dumps({"kind": "folder", "content": content, "made_by": made_by, "files": files}) + "\n"


def _is_run_folder(folder: Path) -> bool:
    marker = read_marker(folder)
    if marker is not None:
        return marker["kind"] == "run"
    return any((folder / s).exists() for s in _RUN_SIGNATURES)


#: Names of the files this tool writes into adapter, export and model folders (how an unmarked folder of an earlier
#: release is told from a folder of the user's that merely holds one such file).
_TOOL_FILE = re.compile(r"(adapter_config\.json|adapter_model\.safetensors|README\.md|lora_rank_config\.json|"
                        r"lora_ranks_adapter\.json|extraction_report\.json|export_report\.json|config\.json|"
                        r"generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                        r"tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.(jinja|json)|vocab\.json|"
                        r"merges\.txt|added_tokens\.json|preprocessor_config\.json|video_preprocessor_config\.json|"
                        r"processor_config\.json)")
#: The model and adapter folders a run of an earlier release wrote inside its folder.
_LAYOUT_FOLDERS = ("pretrained", "finetuned", "half-a", "half-b", "adapter", "warm_start_adapter")


def _only_tool_files(folder: Path) -> bool:
    return all(p.is_file() and not p.is_symlink() and _TOOL_FILE.fullmatch(p.name) for p in folder.iterdir())


def _overlap(out: Path, inputs: Inputs) -> str | None:
    """How ``out`` collides with an input, as a sentence; None when it does not."""
    outs = _spellings(out)
    for name, value in inputs:
        given = local_path(value)
        if given is None:
            continue
        for o in outs:
            for i in _spellings(given):
                real = given.resolve()
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
    existing = _nearest_existing(out)
    if not existing.is_dir():
        return f"lies under {existing}, which is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK) or not _probe_writable(existing):
        return f"cannot be written: no folder can be created in {existing}"
    return None


def _replace_problem(target: Path, content: str) -> str | None:
    """Why replacing the folder ``target`` whole by a folder of ``content`` would take something of the user's;
    None when it would not."""
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return None
    foreign = (f"is a folder this tool did not write, holding {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
               f"({_shown(entries)})")
    marker = read_marker(target)
    if marker is None:  # written before markers, or not by this tool
        if any((target / s).exists() for s in _RUN_SIGNATURES):
            return "holds a run of this tool, which this command would replace whole"
        old_output = any((target / s).is_file() for s in _FOLDER_SIGNATURES)
        old_layout = target.name in _LAYOUT_FOLDERS and any((read_marker(p) or {}).get("kind") == "run"
                                                            for p in target.parents)
        return None if (old_output or old_layout) and _only_tool_files(target) else foreign
    if marker["kind"] == "run":
        return f"holds a {marker.get('made_by', 'lora-ranks')} run of this tool, which this command would replace whole"
    if marker["kind"] != "folder":
        return foreign
    if marker.get("content", "folder") != content:
        held = marker.get("content", "folder")
        return (f"holds {_a(held)} {held} folder of this tool, which this command would replace with {_a(content)} "
                f"{content}")
    written = set(marker["files"])
    added = sorted(str(p.relative_to(target)) for p in target.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.name != MARKER and str(p.relative_to(target)) not in written)
    if added:
        return f"holds {len(added)} file(s) this tool did not write ({_shown(added)})"
    return None


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
        if inner == folder or marker is None or marker["kind"] != "folder":
            continue
        problem = _replace_problem(inner, marker.get("content", "folder"))
        if problem:
            return f"holds {inner}, which {problem.removeprefix('holds ')}: move it out of the run folder first"
    return None


def _probe_writable(folder: Path) -> bool:
    """Whether a folder can be created in ``folder`` (root passes ``os.access`` on /proc and /sys too): one temporary
    folder made and removed."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lora-ranks-probe-", dir=folder))
    except OSError:
        return False
    return True


def check_output_dir(path: str | os.PathLike, *, inputs: Inputs = (), overwrite: bool = False,
                     folder_output: bool = False, folder_content: str = "adapter", flag: str = "--out") -> Path:
    """Refuse an output that would take anything of the user's (module docstring); returns it resolved.

    Args:
        path: the output folder.
        inputs: ``(flag, path)`` of each input of the command (hub ids and unset ones are skipped).
        overwrite: write into (run folder) or replace (folder output) a folder this tool did not write.
        folder_output: the output replaces its target whole (an adapter, an export) instead of being written into.
        folder_content: what a folder output holds ("adapter", "model"): a folder of this tool holding another kind
            is not replaced.
        flag: how the output is named in messages.

    Raises:
        OutputFolderError: naming the output, what is wrong, and the way to proceed.
    """
    given = Path(path)  # as the writers take it: a quoted ~ is a folder named ~
    shown = Path(os.path.abspath(given))
    try:
        shown = given.resolve() if given.exists() else shown
        problem = _path_problem(given, list(inputs), folder_output=folder_output)
        out = given.resolve()
        if problem is None and out.is_dir() and not folder_output:
            links = _links_inside(out)
            problem = (f"holds symbolic links ({_shown(links)}) that writes would follow out of it: remove them" if links
                       else _inner_problems(out))
    except OSError as exc:  # a name too long for the file system, a path that cannot be listed
        raise OutputFolderError(f"{flag} {shown} cannot be used: {exc.strerror or exc}") from None
    if problem:
        raise OutputFolderError(f"{flag} {shown} {problem}")
    if out.is_dir() and not overwrite:
        if folder_output:
            problem = _replace_problem(out, folder_content)
        elif any(out.iterdir()) and not _is_run_folder(out):
            entries = sorted(p.name for p in out.iterdir())
            marker = read_marker(out)
            kind = ("an adapter or model folder of this tool" if marker and marker["kind"] == "folder"
                    else "a folder this tool did not write")
            problem = f"is {kind}, holding {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({_shown(entries)})"
        if problem:
            raise OutputFolderError(f"{flag} {out} {problem}: choose a new or empty folder, or pass --overwrite to "
                                    + ("replace it" if folder_output else "write there anyway"))
    return out


def claim_output_dir(path: str | os.PathLike, made_by: str, *, inputs: Inputs = (), overwrite: bool = False) -> Path:
    """``check_output_dir`` for a run folder, then create it. A folder that was absent or empty gets the run marker
    (later runs, resumes and reruns into it need no ``overwrite``); a non-empty folder of the user's written into
    with ``overwrite`` does not. Returns the folder."""
    from ._io import atomic_write_text

    out = check_output_dir(path, inputs=inputs, overwrite=overwrite)
    fresh = not out.exists() or not any(out.iterdir())
    ours = not fresh and _is_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh or (ours and read_marker(out) is None):  # new, or a run of an earlier release
        atomic_write_text(out / MARKER, json.dumps({"kind": "run", "made_by": made_by}) + "\n")
    elif not ours and read_marker(out) is None:  # a folder of the user's written into with overwrite: still theirs
        atomic_write_text(out / MARKER, json.dumps({"kind": "foreign", "made_by": made_by}) + "\n")
    return out


def check_replaceable(path: str | os.PathLike, overwrite: bool = False, content: str = "folder") -> None:
    """Refuse to replace ``path`` whole unless it is absent, an empty folder, or a folder output of this tool that
    holds only what it wrote (or ``overwrite``); a file or a link is never replaced. What ``_io.atomic_folder``
    checks before it swaps.

    Raises:
        OutputFolderError: naming the target and what it holds.
    """
    target = Path(path)
    problem = _path_problem(target, (), folder_output=True)
    if problem is None and target.is_dir() and not overwrite:
        problem = _replace_problem(target, content)
        if problem:
            problem += ": choose a new or empty folder, or pass --overwrite to replace it"
    if problem:
        raise OutputFolderError(f"{Path(os.path.abspath(target))} {problem}")
