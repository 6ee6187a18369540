"""Rows committed to a results folder (one JSON per row, seed and rate): a rerun, on a fresh clone too, reads them
instead of training again. Their key needs no preparation (``committed_key``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write_json
from ..checkpoints import Checkpoint, resolve_model_path
from ..data import DataError
from ..devices import precision_key
from ..settings import LoRATrainingSettings
from .rows import RowEvaluation, RowResult, RowSpec

__all__ = ["Committed", "committed_key", "committed_name", "check_results_dir", "read_committed", "commit_preparation",
           "read_preparations"]


@dataclass(frozen=True)
class Committed:
    """Where finished rows are committed (one JSON per row, seed and rate) and the digest of the preparation's
    settings their key includes (``committed_key``)."""

    results_dir: str
    design: str


def committed_key(base_model: str, spec: RowSpec, train_path: str, settings: LoRATrainingSettings,
                  evaluation: RowEvaluation, design: str) -> str:
    """A digest of what a committed result (``train_row``'s ``results_dir``) stands for, that needs no preparation to
    compute: the base model's files (config and safetensors headers), the data files' bytes, the row (label, init,
    seed), the training settings (its learning rate included; the precision as it runs here, ``devices.precision_key``),
    the evaluation and ``design`` (the caller's digest of the preparation's settings: fine-tune, analysis,
    allocation). Unlike ``row_key`` it does not read the rank
    config or the warm start, which a fresh clone would have to prepare again."""


    evaluation_paths = {k: v for k, v in asdict(evaluation).items() if not k.endswith("_path")}
    training = precision_key(settings.replace(seed=spec.seed).key_dict())
    digest = hashlib.sha256(json.dumps([spec.label, spec.init, spec.seed, training, evaluation_paths, design],
                                       sort_keys=True, default=str).encode())
    model = resolve_model_path(base_model)
    config = Path(model) / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    digest.update(json.dumps(Checkpoint(model).header_fingerprint(), sort_keys=True, default=str).encode())
    for path in (train_path, evaluation.eval_data_path, evaluation.validation_data_path):
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def committed_name(spec: RowSpec, learning_rate: float) -> str:
    """The file name of a row's committed result: ``<row>-seed<seed>-lr<rate>.json``."""
    return f"{spec.name}-seed{spec.seed}-lr{learning_rate:g}.json"


_COMMITTED = re.compile(r".+-seed\d+-lr[^/]+\.json")


_PREPARATION = re.compile(r"preparation-.+\.json")


def check_results_dir(results_dir: str | Path, flag: str = "--results-dir") -> None:
    """Before any work: ``results_dir`` is a folder (or can be made one), and every file in it named like a committed
    result or preparation is one this tool wrote (a JSON object with its fields): a run reads them and writes over
    stale ones, so a file of the user's under such a name is never replaced.

    Raises:
        DataError: naming the folder and the first file that is not the tool's.
    """


    folder = Path(results_dir)
    if folder.is_symlink() and not folder.exists():
        raise DataError(f"{flag} {results_dir} is a symbolic link to {os.readlink(folder)}, which does not exist: "
                        "give a folder, or create the link's target first")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{flag} {results_dir} is a file: give the folder where row results are committed")
    for parent in Path(os.path.abspath(folder)).parents:
        if parent.is_symlink() and not parent.exists():
            raise DataError(f"{flag} {results_dir} lies under {parent}, a symbolic link to {os.readlink(parent)}, "
                            "which does not exist")
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        row, prep = _COMMITTED.fullmatch(path.name), _PREPARATION.fullmatch(path.name)
        if not (row or prep):
            continue
        try:
            saved = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (OSError, UnicodeDecodeError, ValueError):
            saved = None
        if not isinstance(saved, dict) or ("committed_key" if row else "seconds") not in saved:
            raise DataError(f"{flag} {results_dir} holds {path.name}, named like a result this tool commits but not "
                            "one it wrote: a run would read or replace it: move it, or choose another folder")


def read_committed(results_dir: str | Path, spec: RowSpec, learning_rate: float, key: str) -> RowResult | None:
    """The committed result of this row and rate in ``results_dir`` when its key is ``key``, else None."""
    path = Path(results_dir) / committed_name(spec, learning_rate)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("committed_key", None) != key:
        return None
    saved.pop("key", None)
    return RowResult(**saved)


def _commit(result: RowResult, spec: RowSpec, committed: Committed | None, design_key: str | None) -> None:
    """Write the row's result where finished rows are committed (``committed_name``), with its key."""
    if committed is not None:
        atomic_write_json(Path(committed.results_dir) / committed_name(spec, result.learning_rate),
                          {**asdict(result), "committed_key": design_key})


def _preparation_path(results_dir: str | Path, key: int | None) -> Path:
    """``preparation-seed<seed>.json``, or ``preparation-shared.json`` for one preparation shared by every seed."""
    return Path(results_dir) / f"preparation-{'shared' if key is None else f'seed{key}'}.json"


def commit_preparation(results_dir: str | Path, key: int | None, design: str, record: dict) -> dict:
    """Commit what a seed's preparation cost (``record``: its FLOPs and wall ``seconds``) as soon as it is made, so
    that a comparison stopped before its end still leaves it beside the rows it prepared. Of two records of the same
    ``design`` the one with more seconds is kept: a rerun that found the preparation's steps cached (Prefect's
    cache) measures only the lookups. Returns the committed record."""
    path = _preparation_path(results_dir, key)
    saved = json.loads(path.read_text()) if path.is_file() else None
    if isinstance(saved, dict) and saved.get("design") == design and saved.get("seconds", 0) >= record["seconds"]:
        return saved
    atomic_write_json(path, {**record, "design": design})
    return {**record, "design": design}


def read_preparations(results_dir: str | Path, design: str) -> dict:
    """The committed preparations of ``design``: seed (or "shared") -> record. Records without a design were
    committed before it was recorded, and are read as they are."""
    found = {}
    for path in sorted(Path(results_dir).glob("preparation-*.json")):
        key = path.stem.removeprefix("preparation-")
        saved = json.loads(path.read_text())
        if saved.get("design", design) == design:
            found[int(key.removeprefix("seed")) if key.startswith("seed") else key] = saved
    return found
