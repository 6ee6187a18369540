"""Which modules of a model are analyzed and adapted: the default target lists and ``TargetSpec``.

Plain data and name matching, no torch: ``settings`` (the options) and ``checkpoints`` (discovery) both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_TARGET_MODULES", "DEFAULT_VISION_TARGET_MODULES", "TargetSpec"]

#: The language model's attention and MLP projections (what LoRA usually adapts).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Qwen2.5-VL vision-tower projections, adapted only when asked (``include_vision``).
DEFAULT_VISION_TARGET_MODULES: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class TargetSpec:
    """Which modules to analyze (built from ``AnalysisSettings.targets``, where each field is documented).

    ``target_modules`` are leaf names or dotted tails matched within the language model's layers
    (``"q_proj"`` matches ``...self_attn.q_proj``); ``target_regex``, when given, is full-matched against the
    module name instead; vision-tower blocks are targets only with ``include_vision``.
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

    def order(self, module_name: str) -> int:
        """Position of the module's tail in the target lists (q, k, v, ... order within a layer)."""
        tails = self.target_modules + self.vision_target_modules
        return next((i for i, t in enumerate(tails) if module_name.endswith("." + t)), len(tails))
