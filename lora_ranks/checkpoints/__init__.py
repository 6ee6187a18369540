"""Stage 1: read a (pretrained, fine-tuned) checkpoint pair lazily and yield weight deltas.

    hub.py      model folders and hub ids (``resolve_model_path``)
    reader.py   one checkpoint, read tensor by tensor (``Checkpoint``), and its fingerprints
    naming.py   module names as PEFT sees them, and which modules are targets (``TargetSpec``, ``ModuleRef``)
    pair.py     the pair: validation, discovery, preflight, deltas (``CheckpointPair``)
"""

from ..targets import DEFAULT_TARGET_MODULES, DEFAULT_VISION_TARGET_MODULES
from .hub import CheckpointError, resolve_model_path
from .naming import ModuleRef, TargetSpec, build_meta_model
from .pair import CheckpointPair
from .reader import Checkpoint

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
