"""An adapter folder read back (``read_adapter``), and what each LLM server would make of it.

Per-module ranks reach PEFT through ``rank_pattern`` / ``alpha_pattern``; PEFT honours both, most servers do not
(read from their sources, 2026-11; ``SERVERS`` below). ``serving_problems`` names, per server, how it would read an
adapter wrong; ``note_serving`` records how an adapter was made and says so in its README when it is saved.
``export.py`` writes the exports every server reads right.
"""

from __future__ import annotations

# PEFT is imported to resolve a rank pattern: reading an adapter's config and names does without it.
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ._io import atomic_write_json, strict_json_loads
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, PROVENANCE
from .errors import LoraRanksError, list_problems
from .settings import SERVING_RANKS

__all__ = ["AdapterError", "LoRAModule", "Adapter", "read_adapter", "serving_problems", "serving_readme",
           "served_scales", "note_serving", "SERVERS"]



# How each server scales and stores a PEFT LoRA (what ``serving_problems`` checks).
SERVERS = {
    "vLLM": "one global scale lora_alpha / r (or / sqrt(r) with use_rslora) for every module; "
            f"max_lora_rank one of {', '.join(map(str, SERVING_RANKS))}",
    "llama.cpp": "each tensor scaled by lora_alpha / its own rank (alpha_pattern and use_rslora dropped)",
    "SGLang": "buffers sized from the global r: every module must have rank r",
    "LoRAX / TGI": "each module type stacked across layers: its rank must not differ across layers",
}


class AdapterError(LoraRanksError):
    """An adapter folder that cannot be read or exported as asked."""


@dataclass
class LoRAModule:
    """One adapted module: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r), in the adapter's dtype; ``scale`` is what
    PEFT multiplies B A by (alpha / r, or alpha / sqrt(r) with rsLoRA)."""

    name: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the adapted weight."""
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])

    @property
    def kind(self) -> str:
        """The module type (``q_proj``, ``down_proj``, ...)."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class Adapter:
    """A saved PEFT LoRA adapter: its ``adapter_config.json`` and its modules by name (names as in the base model)."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoRAModule]
    bytes: int
    provenance: dict[str, Any]

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.modules.items()}


def read_adapter(folder: str | Path, *, weights: bool = True) -> Adapter:
    """Read and check a PEFT LoRA adapter folder (safetensors only).

    With ``weights=False`` only the safetensors header is read: the modules' tensors are on the meta device (shapes,
    ranks and scales without the data), which is all the checks and ``serving_problems`` need.

    Every module's tensors must be present in pairs, with ``lora_A.shape[0] == lora_B.shape[1]`` equal to the rank
    ``adapter_config.json`` gives it (through ``rank_pattern`` as PEFT matches it).

    Raises:
        AdapterError: no such folder, no ``adapter_config.json`` or weights, not a LoRA, DoRA or extra trained
            tensors (not exportable), or weights that do not match the config's ranks (every problem listed).
    """
    root = Path(folder)
    config_path, weights_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    _check_adapter_folder(root)
    config = _adapter_config(config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) if weights else torch.empty(f.get_slice(k).get_shape(), device="meta")
                       for k in f.keys()}
    except Exception as exc:  # a truncated or foreign file: safetensors' own message says what
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    from peft.utils.other import get_pattern_key

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key.removeprefix(PEFT_KEY_PREFIX).removesuffix(suffix), {})[part] = tensor
                break
        else:
            problems.append(f"{key}: not a lora_A/lora_B weight (modules_to_save, biases or embeddings are not exported)")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: has {', '.join(pair)} but not both lora_A and lora_B")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", 8))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a LoRA")
        elif a.shape[0] != r:
            problems.append(f"{name}: weights have rank {a.shape[0]} but adapter_config.json gives rank {r}")
        else:
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            modules[name] = LoRAModule(name, a, b, float(alpha), float(scale))
    if not pairs:
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    if problems:
        raise AdapterError(list_problems(str(root), problems))
    provenance_path = root / PROVENANCE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    return Adapter(root, config, modules, weights_path.stat().st_size, provenance)


def _check_adapter_folder(root: Path) -> None:
    """``root`` is a folder with ``adapter_config.json`` and safetensors weights (``AdapterError`` naming what is not)."""
    if root.is_file():
        hint = f" (the adapter is the folder {root.parent})" if root.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) else ""
        raise AdapterError(f"{root} is a file; an adapter is a folder holding adapter_config.json and {ADAPTER_WEIGHTS}"
                           + hint)
    if not root.is_dir():
        raise AdapterError(f"{root}: no such adapter folder")
    if not (root / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{root} has no adapter_config.json; is it a saved PEFT adapter?")
    if not (root / ADAPTER_WEIGHTS).is_file():
        found = "adapter_model.bin (pickle, not read for safety)" if (root / "adapter_model.bin").is_file() else "none"
        raise AdapterError(f"{root} has no {ADAPTER_WEIGHTS} (weights found: {found})")


def _adapter_config(config_path: Path) -> dict:
    """``adapter_config.json``, checked: a JSON object of a LoRA (not DoRA) adapter with positive ``r`` and alpha."""
    try:
        config = strict_json_loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: must hold a JSON object, got {type(config).__name__}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise AdapterError(f"{config_path}: {key} must be a positive number, got {value!r}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be exported")
    if config.get("use_dora"):
        raise AdapterError(f"{config_path}: a DoRA adapter (use_dora true) has magnitude vectors that no zero-padding "
                           "or global scale can carry; it cannot be exported")
    return config


def served_scales(adapter: Adapter, server: str) -> dict[str, float]:
    """The scale each module gets on ``server`` ("vLLM" or "llama.cpp"), by the rule in ``SERVERS`` (PEFT's is
    each module's ``scale``)."""
    config = adapter.config
    if server == "vLLM":
        r = config.get("r", 8)
        scale = config.get("lora_alpha", 8) / (math.sqrt(r) if config.get("use_rslora") else r)
        return {n: scale for n in adapter.modules}
    if server == "llama.cpp":
        return {n: config.get("lora_alpha", 8) / m.rank for n, m in adapter.modules.items()}
    raise ValueError(f"served_scales: unknown server {server!r} (vLLM or llama.cpp)")


def serving_problems(adapter: Adapter, rel_tol: float = 1e-6) -> dict[str, str]:
    """Server -> what goes wrong when it serves this adapter (servers that serve it right are left out)."""
    out = {}
    for server in ("vLLM", "llama.cpp"):
        served = served_scales(adapter, server)
        wrong = [n for n, s in served.items() if not math.isclose(s, adapter.modules[n].scale, rel_tol=rel_tol)]
        if wrong:
            out[server] = (f"mis-scales {len(wrong)} of {len(adapter.modules)} modules (e.g. {wrong[0]}: "
                           f"{served[wrong[0]]:.4g} instead of {adapter.modules[wrong[0]].scale:.4g})")
    r = adapter.config.get("r", 8)
    off = [n for n, m in adapter.modules.items() if m.rank != r]
    if off:
        out["SGLang"] = (f"rejects it: {len(off)} modules differ from the global r={r} "
                         f"(e.g. {off[0]}: {adapter.modules[off[0]].rank})")
    by_kind: dict[str, set[int]] = {}
    for m in adapter.modules.values():
        by_kind.setdefault(m.kind, set()).add(m.rank)
    mixed = sorted(k for k, ranks in by_kind.items() if len(ranks) > 1)
    if mixed:
        out["LoRAX / TGI"] = f"reject it: ranks differ across layers for {', '.join(mixed)}"
    return out


def serving_readme(adapter: Adapter, problems: dict[str, str], folder: str | Path | None = None) -> str:
    """The README section saved with an adapter that some servers would get wrong (``folder``: where the adapter
    will be, for the export command; default: where it is)."""
    folder = folder or adapter.folder
    lines = ["## Serving this adapter", "",
             f"Per-module ranks {min(adapter.ranks.values())}-{max(adapter.ranks.values())} and scales are exact in PEFT "
             "(`PeftModel.from_pretrained`). These servers would get it wrong:", ""]
    lines += [f"- **{server}** ({SERVERS[server]}): {problem}." for server, problem in problems.items()]
    lines += ["", "Export a copy every server reads right (zero-padded to one serving rank, scales folded in; exact):",
              "", "```", f"lora-ranks export {folder} --out {folder}-uniform --format uniform",
              "```", "", "or merge it into the base model (`--format merged`).", ""]
    return "\n".join(lines)


def note_serving(folder: str | Path, provenance: dict[str, Any], final_folder: str | Path | None = None) -> dict[str, str]:
    """While saving an adapter into ``folder`` (a staging folder that becomes ``final_folder``): record how it was
    made, and when servers would get it wrong, say so in its README (appended to PEFT's model card if there is
    one). Returns the problems by server (empty when none)."""
    root = Path(folder)
    atomic_write_json(root / PROVENANCE, provenance)
    adapter = read_adapter(root, weights=False)
    problems = serving_problems(adapter)
    if problems:
        readme = root / "README.md"
        before = readme.read_text().rstrip() + "\n\n" if readme.is_file() else ""
        readme.write_text(before + serving_readme(adapter, problems, Path(final_folder or folder).resolve()))
    return problems
