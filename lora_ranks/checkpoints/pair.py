"""A (pretrained, fine-tuned) checkpoint pair: validation of everything the headers tell, target discovery,
and the weight deltas ``W_finetuned - W_pretrained``."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch

from ..errors import list_problems
from .hub import CheckpointError
from .naming import ModuleRef, NameMapper, TargetSpec, is_vision_stack, layer_of
from .reader import Checkpoint

__all__ = ["CheckpointPair", "problems_error"]

# Config fields that must agree between the two checkpoints (when present).
_ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16"}
_DELTA_BLOCK_ELEMENTS = 1 << 20  # rows per in-place subtraction block, in elements (8 MB of float64)


def problems_error(what: str, problems: Sequence[str]) -> CheckpointError:
    """One error listing every problem found (the first 50, then a count), on one line."""
    return CheckpointError(list_problems(what, problems))


class CheckpointPair:
    """A pretrained and a fine-tuned checkpoint of the same architecture.

    ``modules(targets)`` lists the adaptable linear layers (validated to exist with equal 2-D shapes in both);
    ``delta(module)`` returns ``W_finetuned - W_pretrained`` of shape ``(d_out, d_in)``; ``preflight(targets)``
    checks everything the headers can tell and lists every problem in one error.

    Raises (on construction):
        CheckpointError: listing the problems of both checkpoints (missing, unreadable, pickle-only, ...) and
            every architecture field on which they disagree.
    """

    def __init__(self, base: str | Path | Checkpoint, finetuned: str | Path | Checkpoint, *, allow_pickle: bool = False):
        opened, failures = [], []
        for ckpt in (base, finetuned):
            try:
                opened.append(ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt, allow_pickle=allow_pickle))
            except CheckpointError as exc:
                failures.append(exc)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise problems_error("checkpoint pair", [str(exc) for exc in failures])
        self.base, self.finetuned = opened
        problems = self._architecture_problems()
        if problems:
            raise problems_error(f"checkpoints {self.base.root} and {self.finetuned.root} describe different "
                                 "architectures", problems)

    def _architecture_problems(self) -> list[str]:
        a, b = self.base.config, self.finetuned.config
        problems = []
        for scope in (None, "text_config", "vision_config"):
            va = a.get(scope, {}) if scope else a
            vb = b.get(scope, {}) if scope else b
            if not isinstance(va, dict) or not isinstance(vb, dict):
                continue
            for key in _ARCH_FIELDS:
                if key in va and key in vb and va[key] != vb[key]:
                    problems.append(f"{scope + '.' if scope else ''}{key} is {va[key]!r} in the base but {vb[key]!r} "
                                    "in the fine-tuned model")
        return problems

    @cached_property
    def _mapper(self) -> NameMapper:
        return NameMapper(self.base.root)

    @property
    def base_parameters(self) -> int:
        """Parameter count of the base model (from the meta-device build; falls back to summing tensors)."""
        if self._mapper.base_parameters is not None:
            return self._mapper.base_parameters
        return sum(math.prod(self.base.shape(key)) for key in self.base.keys())

    # -- discovery -----------------------------------------------------------------------------
    def _targets_of(self, ckpt: Checkpoint, targets: TargetSpec) -> dict[str, ModuleRef]:
        """Target modules of one checkpoint by tensor name (shapes from that checkpoint's header)."""
        found = {}
        for key in ckpt.keys():
            if not key.endswith(".weight"):
                continue
            loaded = self._mapper.loaded_name(key)
            if loaded is None:
                continue
            name = loaded[: -len(".weight")]
            where = layer_of(name)
            if where is None or not targets.selects(name, where[3]):
                continue
            shape = ckpt.shape(key)
            if len(shape) != 2:
                continue
            found[key] = ModuleRef(name, key, (int(shape[0]), int(shape[1])), where[0], where[1], where[2])
        return found

    def _discover(self, targets: TargetSpec) -> tuple[list[ModuleRef], list[str]]:
        """(target modules in pipeline order, every problem found in the headers)."""
        base = self._targets_of(self.base, targets)
        problems = []
        refs = []
        for key, ref in base.items():
            if key not in self.finetuned:
                problems.append(f"tensor {key!r} is missing from the fine-tuned checkpoint {self.finetuned.root}")
                continue
            other = tuple(self.finetuned.shape(key))
            if other != ref.shape:
                problems.append(f"tensor {key!r} has shape {ref.shape} in the base but {other} in the fine-tuned model")
                continue
            bad = [(role, dtype) for role, dtype in (("base", self.base.dtype(key)), ("fine-tuned", self.finetuned.dtype(key)))
                   if dtype not in _FLOAT_DTYPES]
            if bad:
                problems.append(f"tensor {key!r} is stored as {bad[0][1]} in the {bad[0][0]} checkpoint; deltas need "
                                "floating-point weights (dequantize first)")
                continue
            refs.append(ref)
        extra = [k for k in self._targets_of(self.finetuned, targets) if k not in base]
        problems += [f"tensor {k!r} is in the fine-tuned checkpoint but missing from the base {self.base.root}"
                     for k in extra]
        if not base and not extra:
            problems.append(f"no module of {self.base.root} matches the targets (target_modules="
                            f"{list(targets.target_modules)}, target_regex={targets.target_regex!r})")
        # Order: language model before vision tower, then stack, depth and the order of the target list (q, k, v, ...).
        refs.sort(key=lambda r: (is_vision_stack(r.layer), r.layer.rsplit(".", 1)[0], r.depth, targets.order(r.name)))
        return refs, problems

    def modules(self, targets: TargetSpec = TargetSpec()) -> list[ModuleRef]:
        """All target modules, ordered by stack, depth and target list; validated in both checkpoints.

        Raises:
            CheckpointError: listing every target tensor missing from either checkpoint, shaped differently, or
                not floating point, or when no module matches ``targets``.
        """
        refs, problems = self._discover(targets)
        if problems:
            raise problems_error(f"checkpoints {self.base.root} and {self.finetuned.root}", problems)
        return refs

    def layers(self, targets: TargetSpec = TargetSpec()) -> OrderedDict[str, list[ModuleRef]]:
        """Target modules grouped by layer (the unit of parallel work), in depth order."""
        grouped: OrderedDict[str, list[ModuleRef]] = OrderedDict()
        for ref in self.modules(targets):
            grouped.setdefault(ref.layer, []).append(ref)
        return grouped

    def preflight(self, targets: TargetSpec = TargetSpec()) -> OrderedDict[str, list[ModuleRef]]:
        """Check everything the headers can tell, before any tensor is read; return the layers.

        Checked: every shard of both checkpoints is readable and complete (truncated downloads), every target
        tensor exists in both with the same 2-D shape and a floating-point dtype, nothing extra. Problems that
        need the data (NaN or Inf) show up later, in ``delta``.

        Raises:
            CheckpointError: listing every problem found, not only the first.
        """
        problems = self.base.file_problems() + self.finetuned.file_problems()
        if problems:  # unreadable shards make the header checks below meaningless
            raise problems_error(f"checkpoints {self.base.root} and {self.finetuned.root}", problems)
        return self.layers(targets)

    def check_contents(self, modules: Sequence[ModuleRef]) -> None:
        """Read every module's weight in both checkpoints once, before any analysis: refuse NaN or Inf (every such
        tensor listed) and a pair whose analyzed weights are all identical (nothing was fine-tuned). Memory: one
        module's two weights at a time.

        Raises:
            CheckpointError: naming the non-finite tensors, or saying the two checkpoints are identical.
        """
        if self.base.root == self.finetuned.root:
            raise CheckpointError(f"the base and the fine-tuned checkpoint are the same folder ({self.base.root}): give "
                                  "the fine-tuned model's folder as --finetuned")
        problems, changed = [], False
        try:
            for module in modules:
                base, tuned = self.base.get(module.weight_key), self.finetuned.get(module.weight_key)
                for ckpt, weight in ((self.base, base), (self.finetuned, tuned)):
                    if not bool(torch.isfinite(weight).all()):
                        problems.append(f"tensor {module.weight_key!r} in {ckpt.root} contains NaN or Inf")
                changed = changed or base.dtype != tuned.dtype or not torch.equal(base, tuned)
        finally:
            self.close()
        if problems:
            raise problems_error("non-finite weights", problems)
        if not changed:
            raise CheckpointError(f"the checkpoints {self.base.root} and {self.finetuned.root} are identical in all "
                                  f"{len(modules)} analyzed modules: nothing was fine-tuned (was the fine-tuned model "
                                  "saved elsewhere?)")

    # -- deltas ---------------------------------------------------------------------------------
    def delta(self, module: ModuleRef, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_finetuned - W_pretrained`` for one module: Tensor of shape ``(d_out, d_in)`` in ``dtype``.

        Raises:
            CheckpointError: if either weight or the delta holds NaN or Inf (naming the tensor and file).
        """
        base = self.base.get(module.weight_key)
        tuned = self.finetuned.get(module.weight_key)
        delta = tuned.to(dtype, copy=True)  # (d_out, d_in); a copy: the stored tensor may be memory-mapped
        # In place, by blocks of rows: a mixed-dtype sub_ converts its whole operand first (another full-size
        # buffer, 543 MB for an 18944x3584 float64 delta); blocks keep that to ~8 MB.
        rows = max(1, _DELTA_BLOCK_ELEMENTS // max(1, delta[0].numel()))
        for start in range(0, delta.shape[0], rows):
            delta[start:start + rows].sub_(base[start:start + rows])
        # One cheap reduction instead of three isfinite passes: NaN or Inf in either weight reaches the delta,
        # and any non-finite entry makes the sum non-finite. Only then look closer (the sum alone can also
        # overflow on huge finite values, which is fine).
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

    # -- identities -----------------------------------------------------------------------------
    def fingerprints(self, modules: Iterable[ModuleRef]) -> tuple[str, str]:
        """Content digests (sha256 of stored bytes, dtypes, shapes) of ``modules``' weights in the base and the
        fine-tuned checkpoint: they change iff a weight changes, so they key caches and identify runs."""
        modules = list(modules)
        return self.base.content_digest(m.weight_key for m in modules), \
            self.finetuned.content_digest(m.weight_key for m in modules)

    def identity(self, content: tuple[str, str] | None = None) -> dict:
        """Sources, paths and fingerprints of both checkpoints (for the config's metadata).

        ``header_fingerprint`` covers names, shapes, dtypes and sizes of every shard; ``content``, when given, is
        the (base, fine-tuned) digest of the analyzed tensors' bytes.
        """
        out = {}
        for role, ckpt, digest in (("pretrained", self.base, content[0] if content else None),
                                   ("finetuned", self.finetuned, content[1] if content else None)):
            out[role] = {"source": ckpt.source, "path": str(ckpt.root), "header_fingerprint": ckpt.header_fingerprint()}
            if digest is not None:
                out[role]["content_fingerprint"] = digest
        return out
