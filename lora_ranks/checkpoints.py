"""Stage 1: read a (pretrained, fine-tuned) checkpoint pair lazily and yield weight deltas.

Both checkpoints are Hugging Face model folders (``config.json`` plus ``*.safetensors``, single-file or
sharded with ``model.safetensors.index.json``) or hub ids resolved to a local snapshot. Tensors are read
one at a time through ``safetensors.safe_open`` (memory-mapped), so peak memory is a few matrices, never a
model. Deltas are computed in float32 whatever the stored dtype.

Names. A rank config is consumed by PEFT on the *loaded* model, whose module names can differ from the
tensor names on disk (transformers 5 loads Qwen2.5-VL's ``model.layers.N`` as
``model.language_model.layers.N`` and ``visual.blocks.N`` as ``model.visual.blocks.N``). We build the
model on the meta device (no memory) and apply transformers' own checkpoint-conversion renamings, so the
config carries exactly the names PEFT will see.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "CheckpointPair",
    "ModuleRef",
    "TargetSpec",
    "DEFAULT_TARGET_MODULES",
    "DEFAULT_VISION_TARGET_MODULES",
    "resolve_model_path",
    "build_meta_model",
]

#: The language model's attention and MLP projections (what LoRA usually adapts).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Qwen2.5-VL vision-tower projections, adapted only when asked (``include_vision=True``).
DEFAULT_VISION_TARGET_MODULES: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# A module belongs to a repeated block ("layer") when its name contains `<stack>.<index>.`.
_LAYER_RE = re.compile(r"^(?P<stack>.*?\.(?:layers|blocks|h|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_VISION_STACK_RE = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vit)(\.|$)")
# Config fields that must agree between the two checkpoints (when present).
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not pair with the other one."""


def resolve_model_path(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """Return the local folder of a model given a folder path or a Hugging Face hub id.

    Hub ids are resolved with ``huggingface_hub.snapshot_download`` (only ``*.json``, ``*.safetensors``
    and tokenizer files are fetched); an existing cache is used first, so this works offline for models
    already downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; expected a model folder with config.json")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(name_or_path)):
        raise CheckpointError(f"model folder {str(name_or_path)!r} does not exist (and is not a hub id like 'Qwen/Qwen3-8B')")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached yet: fall through to a download
        pass
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns))
    except Exception as exc:  # no hub here, or no such repo
        raise CheckpointError(f"could not resolve hub id {str(name_or_path)!r} to a local snapshot: {exc}") from exc


@dataclass(frozen=True)
class TargetSpec:
    """Which modules to analyze.

    Attributes:
        target_modules: module leaf names (PEFT-style: ``"q_proj"`` matches ``...self_attn.q_proj``) or
            dotted tails (``"attn.qkv"``); matched within the language model's layers.
        target_regex: optional regex, full-matched against the in-memory module name; when given it is
            used *instead of* ``target_modules`` (vision modules still need ``include_vision``).
        include_vision: also analyze the vision tower of vision-language models (off by default: most
            users fine-tune only the language model).
        vision_target_modules: leaf names/tails for vision-tower blocks.
    """

    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    target_regex: str | None = None
    include_vision: bool = False
    vision_target_modules: tuple[str, ...] = DEFAULT_VISION_TARGET_MODULES

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "vision_target_modules", tuple(self.vision_target_modules))
        if not self.target_modules and self.target_regex is None:
            raise ValueError("TargetSpec needs target_modules or target_regex; got neither")
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                raise ValueError(f"target_regex {self.target_regex!r} is not a valid regex: {exc}") from exc

    def selects(self, module_name: str, is_vision: bool) -> bool:
        """True if ``module_name`` (in-memory name) is a target."""
        if is_vision and not self.include_vision:
            return False
        if self.target_regex is not None:
            return re.fullmatch(self.target_regex, module_name) is not None
        tails = self.vision_target_modules if is_vision else self.target_modules
        return any(module_name == t or module_name.endswith("." + t) for t in tails)


@dataclass(frozen=True)
class ModuleRef:
    """One adaptable linear layer of the pair.

    Attributes:
        name: module name on the loaded model, as PEFT sees it (``model.layers.3.self_attn.q_proj``).
        weight_key: tensor name on disk (``model.layers.3.self_attn.q_proj.weight``).
        shape: ``(d_out, d_in)`` of the weight.
        layer: the repeated block it belongs to (``model.layers.3``): the unit of parallel work.
        depth: index of that block within its stack.
        module_type: what it is across depth (``q_proj``; ``visual.attn.qkv`` in the vision tower).
    """

    name: str
    weight_key: str
    shape: tuple[int, int]
    layer: str
    depth: int
    module_type: str


class Checkpoint:
    """A safetensors model folder opened for lazy, per-tensor reads.

    Only the header of each shard is read on open; ``get(name)`` memory-maps one tensor.
    """

    def __init__(self, name_or_path: str | Path, *, allow_pickle: bool = False, revision: str | None = None):
        self.source = str(name_or_path)
        self.root = resolve_model_path(name_or_path, revision=revision)
        config_path = self.root / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.root} has no config.json; is it a Hugging Face model folder?")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, object] = {}  # shard -> open safe_open handle (or loaded pickle state)
        self._handles_lock = threading.Lock()  # modules of a layer are read from several threads
        self.tensor_files: dict[str, Path] = self._index_tensors()

    # -- discovery -----------------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, Path]:
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map'): {exc}") from exc
            files = {name: self.root / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} lists shard {shard.name}, which is missing from {self.root}")
            return files
        shards = sorted(self.root.glob("*.safetensors"))
        if shards:
            files = {}
            for shard in shards:
                for name in self._safe_keys(shard):
                    files[name] = shard
            return files
        pickles = sorted(self.root.glob("*.bin")) + sorted(self.root.glob("*.pt"))
        if pickles:
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{self.root} holds only pickle-based weights ({pickles[0].name}); loading pickles can run "
                    "arbitrary code, so they are refused. Convert the model to safetensors, or pass "
                    "allow_pickle=True (--allow-pickle) to load them with torch.load(weights_only=True)."
                )
            files = {}
            for shard in pickles:
                for name in self._pickle_state(shard):
                    files[name] = shard
            return files
        raise CheckpointError(f"{self.root} contains no *.safetensors weights")

    @staticmethod
    def _safe_keys(shard: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file {shard}: {exc} (truncated or corrupt?)") from exc

    def _pickle_state(self, shard: Path) -> dict[str, torch.Tensor]:
        with self._handles_lock:
            if shard not in self._handles:
                try:  # weights_only: tensors and containers only, no arbitrary objects
                    state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise CheckpointError(f"cannot load {shard} with torch.load(weights_only=True): {exc}") from exc
                self._handles[shard] = state
            return self._handles[shard]

    def _handle(self, shard: Path):
        with self._handles_lock:
            if shard not in self._handles:
                from safetensors import safe_open

                try:
                    self._handles[shard] = safe_open(str(shard), framework="pt")
                except Exception as exc:
                    raise CheckpointError(f"cannot open {shard}: {exc}") from exc
            return self._handles[shard]

    # -- reads ----------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.tensor_files

    def keys(self) -> list[str]:
        return list(self.tensor_files)

    def shape(self, key: str) -> tuple[int, ...]:
        shard = self._file(key)
        if shard.suffix != ".safetensors":
            return tuple(self._pickle_state(shard)[key].shape)
        return tuple(self._handle(shard).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (memory-mapped, in its stored dtype)."""
        shard = self._file(key)
        if shard.suffix != ".safetensors":
            return self._pickle_state(shard)[key]
        try:
            return self._handle(shard).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {shard}: {exc} (truncated or corrupt file?)") from exc

    def _file(self, key: str) -> Path:
        try:
            return self.tensor_files[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in checkpoint {self.root}") from None

    def content_digest(self, keys: Iterable[str]) -> str:
        """sha256 over the stored bytes, dtype and shape of the tensors ``keys``, in the given order."""
        digest = hashlib.sha256()
        for key in keys:
            tensor = self.get(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def header_fingerprint(self) -> str:
        """sha256 over every shard's safetensors header and size: changes whenever names, shapes,
        dtypes or file sizes change. Cheap (reads headers only); content hashes are per layer."""
        digest = hashlib.sha256()
        for shard in sorted(set(self.tensor_files.values())):
            with open(shard, "rb") as handle:
                head = handle.read(8)
                digest.update(shard.name.encode())
                digest.update(head)
                if shard.suffix == ".safetensors" and len(head) == 8:
                    digest.update(handle.read(int.from_bytes(head, "little")))
            digest.update(str(shard.stat().st_size).encode())
        return digest.hexdigest()

    def close(self) -> None:
        """Drop open file handles (their memory-mapped pages leave the process); reads reopen lazily."""
        with self._handles_lock:
            self._handles.clear()

    def __getstate__(self):  # open file handles and locks do not pickle; reopen lazily after a round trip
        state = dict(self.__dict__)
        state["_handles"] = {}
        del state["_handles_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles_lock = threading.Lock()


def build_meta_model(model_dir: str | Path):
    """The model of ``model_dir``'s config.json, built on the meta device (no memory, no weights read).

    The class is the config's ``architectures[0]`` when transformers has it, else AutoModelForCausalLM.
    Custom code is never run (``trust_remote_code=False``).
    """
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)


class _NameMapper:
    """Maps on-disk tensor names to the names of the loaded model (see module docstring)."""

    def __init__(self, root: Path):
        self.meta_state: dict[str, tuple[int, ...]] | None = None
        self.base_parameters: int | None = None
        self._renamings: list = []
        self._converters: list = []
        self._prefix: str | None = None
        try:
            self._build(root)
        except Exception as exc:  # unknown architecture: names on disk are the best we have
            warnings.warn(f"could not build {root} on the meta device ({exc}); using on-disk tensor names as module names")

    def _build(self, root: Path) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        model = build_meta_model(root)
        self.meta_state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.base_parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
        transforms = get_model_conversion_mapping(model)
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self._prefix = model.base_model_prefix

    def loaded_name(self, disk_key: str) -> str | None:
        """In-memory parameter name for ``disk_key``, or None if the loaded model has no such parameter."""
        if self.meta_state is None:
            return disk_key
        from transformers.core_model_loading import rename_source_key

        renamed, converter = rename_source_key(disk_key, self._renamings, self._converters, self._prefix, self.meta_state)
        if converter is not None or renamed not in self.meta_state:
            return None
        return renamed


_DELTA_BLOCK_ELEMENTS = 1 << 20  # rows per in-place subtraction block, in elements (8 MB of float64)


class CheckpointPair:
    """A pretrained and a fine-tuned checkpoint of the same architecture.

    ``modules(targets)`` lists the adaptable linear layers (validated to exist with equal 2-D shapes in
    both); ``delta(module)`` returns ``W_finetuned - W_pretrained`` as float32 of shape ``(d_out, d_in)``.
    """

    def __init__(self, base: str | Path | Checkpoint, finetuned: str | Path | Checkpoint, *, allow_pickle: bool = False):
        self.base = base if isinstance(base, Checkpoint) else Checkpoint(base, allow_pickle=allow_pickle)
        self.finetuned = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint(finetuned, allow_pickle=allow_pickle)
        self._check_architecture()

    def _check_architecture(self) -> None:
        a, b = self.base.config, self.finetuned.config
        for key in _ARCH_FIELDS:
            for scope in (None, "text_config", "vision_config"):
                va = a.get(scope, {}) if scope else a
                vb = b.get(scope, {}) if scope else b
                if not isinstance(va, dict) or not isinstance(vb, dict):
                    continue
                if key in va and key in vb and va[key] != vb[key]:
                    where = f"{scope}.{key}" if scope else key
                    raise CheckpointError(
                        f"checkpoints describe different architectures: {where} is {va[key]!r} in "
                        f"{self.base.root} but {vb[key]!r} in {self.finetuned.root}"
                    )

    @cached_property
    def _mapper(self) -> _NameMapper:
        return _NameMapper(self.base.root)

    @property
    def base_parameters(self) -> int:
        """Parameter count of the base model (from the meta-device build; falls back to summing tensors)."""
        if self._mapper.base_parameters is not None:
            return self._mapper.base_parameters
        total = 0
        for key in self.base.keys():
            n = 1
            for d in self.base.shape(key):
                n *= d
            total += n
        return total

    def modules(self, targets: TargetSpec = TargetSpec()) -> list[ModuleRef]:
        """All target modules, ordered by stack, depth and on-disk order; validated in both checkpoints.

        Raises:
            CheckpointError: naming the first tensor missing from the fine-tuned checkpoint or with a
                different shape, or when no module matches ``targets``.
        """
        refs: list[ModuleRef] = []
        for key in self.base.keys():
            if not key.endswith(".weight"):
                continue
            loaded = self._mapper.loaded_name(key)
            if loaded is None:
                continue
            name = loaded[: -len(".weight")]
            match = _LAYER_RE.match(name)
            if match is None:
                continue
            is_vision = _VISION_STACK_RE.search(match["stack"]) is not None
            if not targets.selects(name, is_vision):
                continue
            shape = self.base.shape(key)
            if len(shape) != 2:
                continue
            if key not in self.finetuned:
                raise CheckpointError(f"tensor {key!r} is in {self.base.root} but missing from {self.finetuned.root}")
            other = self.finetuned.shape(key)
            if tuple(other) != tuple(shape):
                raise CheckpointError(
                    f"tensor {key!r} has shape {tuple(shape)} in {self.base.root} but {tuple(other)} in {self.finetuned.root}"
                )
            rest = match["rest"]
            module_type = ("visual." + rest) if is_vision else rest.split(".")[-1]
            refs.append(ModuleRef(name, key, (int(shape[0]), int(shape[1])), f"{match['stack']}.{match['index']}",
                                  int(match["index"]), module_type))
        if not refs:
            raise CheckpointError(
                f"no module of {self.base.root} matches the targets {targets}; check target_modules / target_regex"
            )
        # Order: language model before vision tower, then depth, then the order of the target list (q, k, v, ...).
        tails = targets.target_modules + targets.vision_target_modules
        rank_of = lambda r: next((i for i, t in enumerate(tails) if r.name.endswith("." + t)), len(tails))  # noqa: E731
        refs.sort(key=lambda r: (_VISION_STACK_RE.search(r.layer) is not None, r.layer.rsplit(".", 1)[0], r.depth, rank_of(r)))
        return refs

    def layers(self, targets: TargetSpec = TargetSpec()) -> "OrderedDict[str, list[ModuleRef]]":
        """Target modules grouped by layer (the unit of parallel work), in depth order."""
        grouped: OrderedDict[str, list[ModuleRef]] = OrderedDict()
        for ref in self.modules(targets):
            grouped.setdefault(ref.layer, []).append(ref)
        return grouped

    def delta(self, module: ModuleRef, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_finetuned - W_pretrained`` for one module, shape ``(d_out, d_in)``, in ``dtype``.

        Raises:
            CheckpointError: if either weight or the delta holds NaN or Inf (naming the tensor and file).
        """
        base = self.base.get(module.weight_key)
        tuned = self.finetuned.get(module.weight_key)
        delta = tuned.to(dtype, copy=True)  # (d_out, d_in); a copy: the stored tensor may be memory-mapped
        # In place, by blocks of rows: a mixed-dtype sub_ converts its whole operand first (another
        # full-size buffer, 543 MB for an 18944x3584 float64 delta); blocks keep that to ~8 MB.
        rows = max(1, _DELTA_BLOCK_ELEMENTS // max(1, delta[0].numel()))
        for start in range(0, delta.shape[0], rows):
            delta[start:start + rows].sub_(base[start:start + rows])
        # One cheap reduction instead of three isfinite passes: NaN or Inf in either weight reaches the
        # delta, and any non-finite entry makes the sum non-finite. Only then look closer (the sum alone can
        # also overflow on huge finite values, which is fine).
        if not math.isfinite(float(delta.sum())):
            for ckpt, weight in ((self.base, base), (self.finetuned, tuned)):
                if not torch.isfinite(weight).all():
                    raise CheckpointError(f"tensor {module.weight_key!r} in {ckpt.root} contains NaN or Inf")
            if not torch.isfinite(delta).all():
                raise CheckpointError(f"delta of {module.weight_key!r} overflows {dtype} (Inf)")
        return delta

    def close(self) -> None:
        """Release both checkpoints' file handles (call between layers to keep memory flat)."""
        self.base.close()
        self.finetuned.close()

    def fingerprints(self, modules: Iterable[ModuleRef]) -> tuple[str, str]:
        """Content digests (sha256 of stored bytes, dtypes, shapes) of ``modules``' weights in the base and
        the fine-tuned checkpoint: they change iff a weight changes, so they key caches and identify runs."""
        modules = list(modules)
        return self.base.content_digest(m.weight_key for m in modules), \
            self.finetuned.content_digest(m.weight_key for m in modules)

    def identity(self, content: tuple[str, str] | None = None) -> dict:
        """Sources, paths and fingerprints of both checkpoints (for the config's metadata).

        ``header_fingerprint`` covers names, shapes, dtypes and sizes of every shard; ``content``, when given,
        is the (base, fine-tuned) digest of the analyzed tensors' bytes.
        """
        out = {}
        for role, ckpt, digest in (("pretrained", self.base, content[0] if content else None),
                                   ("finetuned", self.finetuned, content[1] if content else None)):
            out[role] = {"source": ckpt.source, "path": str(ckpt.root), "header_fingerprint": ckpt.header_fingerprint()}
            if digest is not None:
                out[role]["content_fingerprint"] = digest
        return out

