"""The checks before anything is written: an output path that would take something of the user's is refused in
one line naming it (see the package docstring)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import LoraRanksError
from .markers import (
    MARKER,
    _describes_its_files,
    _edited_run_files,
    _run_contents,
    foreign_files,
    read_marker,
)
import tempfile

__all__ = ["OutputFolderError", "RUN_ENTRIES", "check_output_dir", "check_replaceable", "local_path", "probe_writable"]


#: The top-level names each flow writes into its run folder: what its layout names (``OutputLayout``,
#: ``TrainLayout``, ``ComparisonLayout``, the check's report; ``tests/test_user_files.py`` checks every path they give
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
