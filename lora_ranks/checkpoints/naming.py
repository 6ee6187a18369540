"""Module names as PEFT will see them, and which modules are targets.

A rank config is consumed by PEFT on the *loaded* model, whose module names can differ from the tensor names
on disk (transformers 5 loads Qwen2.5-VL's ``model.layers.N`` as ``model.language_model.layers.N`` and
``visual.blocks.N`` as ``model.visual.blocks.N``). The model is built on the meta device (no memory, no
weights read) and transformers' own checkpoint-conversion renamings are applied, so that configs carry exactly
the names PEFT will see.
"""

from __future__ import annotations

# transformers is imported when a model is built on the meta device (1-5 s the first time): reading a checkpoint's
# headers, and what only needs names, do without it.
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..construction import MODEL_CONSTRUCTION
from ..targets import TargetSpec
from .hub import CheckpointError

__all__ = ["TargetSpec", "ModuleRef", "build_meta_model", "NameMapper", "layer_of", "is_vision_stack"]

# A module belongs to a repeated block ("layer") when its name contains `<stack>.<index>.`.
_LAYER_RE = re.compile(r"^(?P<stack>.*?\.(?:layers|blocks|h|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_VISION_STACK_RE = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vit)(\.|$)")


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


def layer_of(module_name: str) -> tuple[str, int, str, bool] | None:
    """``(layer, depth, module_type, is_vision)`` of a module inside a repeated block, else None."""
    match = _LAYER_RE.match(module_name)
    if match is None:
        return None
    is_vision = is_vision_stack(match["stack"])
    rest = match["rest"]
    module_type = ("visual." + rest) if is_vision else rest.split(".")[-1]
    return f"{match['stack']}.{match['index']}", int(match["index"]), module_type, is_vision


def is_vision_stack(name: str) -> bool:
    """True for names inside a vision tower (``visual``, ``vision_tower``, ...)."""
    return _VISION_STACK_RE.search(name) is not None


def build_meta_model(model_dir: str | Path):
    """The model of ``model_dir``'s config.json, built on the meta device (no memory, no weights read).

    The class is the config's ``architectures[0]`` when transformers has it, else AutoModelForCausalLM.
    Custom code is never run (``trust_remote_code=False``).
    """
    import transformers
    from transformers import AutoConfig


    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face model folder?")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:  # an unknown model_type, a broken config.json
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{model_dir}/config.json does not describe a model transformers knows: {first}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None

    with MODEL_CONSTRUCTION, torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)


class NameMapper:
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
            warnings.warn(f"could not build {root} on the meta device ({exc}); using on-disk tensor names as module names",
                          stacklevel=2)

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
