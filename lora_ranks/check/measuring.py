"""What runs inside a measuring process (``measure.run_isolated``): a training step's peak memory and time, the
adapter's forward latency, and the memory figures they read. torch, transformers and PEFT are imported here at the
top: this module is imported only in the measuring processes (the CPU fork server preloads it) and by callers about
to measure, never by the command line's input checks.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from ..devices import resolve_precision
from ..model import DynamicLoRAConfig, PEFTModelFactory
from ..settings import TrainingSettings
from ..train import training_dtype
from ..training_loop import train_loop
from .measure import TRAINING_STEPS, Target, latency_figures

__all__ = ["measure_training_step", "measure_inference", "peak_resident_bytes"]


def measure_training_step(target: Target, batch: int, seq_len: int, gradient_checkpointing: bool,
                          steps: int = TRAINING_STEPS) -> dict:
    """Peak memory and time of ``steps`` training steps (forward, backward, optimizer step) at batch x seq_len.

    Run it through ``run_isolated``. Returns ``peak_bytes`` (the figure budgets are checked against: CUDA peak
    reserved / CPU peak resident), ``peak_allocated_bytes`` (CUDA), ``device_total_bytes`` (CUDA),
    ``loaded_bytes`` (resident memory once the model is built, CPU), ``step_seconds`` (the last step: the
    first also creates the optimizer state), ``tokens_per_s``, ``peak_covers`` (what the peak includes); or
    ``out_of_memory`` with the message.
    """
    dev = torch.device(target.device)
    try:
        model = _build(target, dev, gradient_checkpointing, with_lora=True)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        return {"out_of_memory": f"loading the model: {_first_line(exc)}", **_peaks(dev, None, "loading")}
    model.train()
    loaded = _resident_bytes()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (steps * batch, seq_len), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [{"input_ids": row, "labels": row} for row in ids]
    settings = TrainingSettings(max_steps=steps, batch_size=batch, grad_accumulation=1, warmup_ratio=0.0,
                                max_length=seq_len, gradient_checkpointing=gradient_checkpointing,
                                optimizer=target.optimizer, precision=target.precision)
    covers = _reset_peaks(dev)
    stamps = [time.perf_counter()]
    try:
        train_loop(model, examples, 0, settings, dev, on_step=lambda *_: stamps.append(_synced_clock(dev)),
                   progress=False, desc="check")
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        return {"out_of_memory": _first_line(exc), **_peaks(dev, loaded, covers)}
    seconds = stamps[-1] - stamps[-2]
    return {**_peaks(dev, loaded, covers), "step_seconds": seconds, "tokens_per_s": batch * seq_len / seconds}


def measure_inference(target: Target, batch: int, seq_len: int, repeats: int) -> dict:
    """Parameter counts and bytes, and forward latency of the base, the unmerged and the merged adapter; also the
    ``dtype`` the base was loaded in and the ``device_name``.

    Run it through ``run_isolated``. Two copies of the model are held: the plain base, and the base with the
    adapter (lora_B drawn with std 0.01, as a trained adapter is not zero). Phase 1 times base and unmerged, phase 2
    (after ``merge_and_unload``) base and merged; each phase runs one warm-up round, then ``repeats`` rounds that
    run both models in alternating order.

    Timings (ms, float): ``base_ms`` is the median of all base rounds of both phases. ``<phase>_overhead`` (phase
    "unmerged" or "merged") is the median of that phase's per-round ratios adapter / base, minus 1 (the upper median
    for an even ``repeats``, so that it is one round's ratio); ``<phase>_ms`` and ``<phase>_base_ms`` are that
    median round's adapter and base times, so ``<phase>_ms / <phase>_base_ms - 1 == <phase>_overhead``.
    ``rounds[<phase>]`` holds the raw per-round times: ``{"base_ms": [...], "adapter_ms": [...]}``, ``repeats``
    each, in round order.
    """
    dev = torch.device(target.device)
    try:
        base = _build(target, dev, False, with_lora=False).eval()
        adapted = _build(target, dev, False, with_lora=True).eval()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        return {"impossible": f"two copies of the model do not fit on {dev} ({_first_line(exc)})"}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    trainable, total = adapted.get_nb_trainable_parameters()
    lora = [p for n, p in adapted.named_parameters() if "lora_" in n]
    counts = {"adapter_parameters": trainable, "parameters": total,
              "adapter_bytes": sum(p.numel() * p.element_size() for p in lora),
              "adapter_dtype": str(lora[0].dtype).removeprefix("torch.") if lora else None,
              "base_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
              "dtype": str(_training_dtype(dev, target.precision)).removeprefix("torch."), "device_name": _device_name(dev)}
    vocab = base.get_input_embeddings().num_embeddings
    tokens = torch.randint(vocab, (batch, seq_len), generator=generator).to(dev)
    try:
        unmerged = _interleaved(base, adapted, tokens, repeats)
        merged = _interleaved(base, adapted.merge_and_unload(), tokens, repeats)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        return {**counts, "impossible": f"out of memory in a forward pass of {batch} x {seq_len} tokens on {dev} "
                                        f"({_first_line(exc)})"}
    return {**counts, **latency_figures({"unmerged": unmerged, "merged": merged})}


def _build(target: Target, dev, gradient_checkpointing: bool, with_lora: bool):
    """The base model (``with_lora=False``) or the PEFT model training builds, on ``dev``."""

    config = DynamicLoRAConfig.from_file(target.rank_config, lora_dropout=target.lora_dropout)
    # bitsandbytes places a quantized model itself: on the measured GPU (index), or on the CPU.
    placement = (dev.index or 0) if dev.type == "cuda" else "cpu"
    factory = PEFTModelFactory(config, quantization=target.quantization, dtype=_training_dtype(dev, target.precision),
                               gradient_checkpointing=gradient_checkpointing, trust_remote_code=target.trust_remote_code,
                               device_map={"": placement} if target.quantization else None)
    model = factory.build(target.model)[0] if with_lora else factory.load_base(target.model)[0]
    return model if target.quantization else model.to(dev)


def _training_dtype(dev, precision: str):
    """The dtype training loads an unquantized base in (and a quantized one computes in) on ``dev``: bf16 when
    ``precision`` resolves to bf16 there (``devices.resolve_precision``), else float32."""
    return training_dtype(resolve_precision(precision, dev))


def _device_name(dev) -> str:

    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _interleaved(base, other, tokens, repeats: int) -> dict:
    """Forward times (ms) of ``base`` and ``other`` over ``repeats`` rounds after a warm-up round; each round runs
    both, in alternating order, so that drifting load or caches favour neither. Returns ``{"base_ms": [...],
    "adapter_ms": [...]}``, ``repeats`` floats each, in round order (``other`` is the adapter model)."""
    dev = tokens.device
    times: dict[str, list[float]] = {"base": [], "other": []}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            order = (("base", base), ("other", other)) if round_ % 2 == 0 else (("other", other), ("base", base))
            for name, model in order:
                start = _synced_clock(dev)
                model(input_ids=tokens)
                if round_ > 0:  # round 0 is the warm-up
                    times[name].append(1000 * (_synced_clock(dev) - start))
    return {"base_ms": times["base"], "adapter_ms": times["other"]}


def _is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, by exception type: ``torch.OutOfMemoryError`` (CUDA's caching allocator) or ``MemoryError``
    (Python's and NumPy's allocations).

    The one failure torch gives no type: its CPU allocator refusing an allocation raises a plain ``RuntimeError``
    (no subclass, torch 2.13: "[enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory");
    only an exception of exactly that type carrying the allocator's own identifier counts, so that no other
    error is taken for a result.
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return type(exc) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (a bare ``MemoryError()``)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _synced_clock(dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _reset_peaks(dev) -> str:
    """Reset the peak-memory statistics after loading; returns what the peak will cover."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return "the training steps (weights resident)"
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")  # Linux: resets VmHWM, the peak resident set size
        return "the training steps (weights resident)"
    except OSError:
        return "loading and the training steps"


def _peaks(dev, loaded: int | None, covers: str) -> dict:
    if dev.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_reserved(dev), "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
                "device_total_bytes": torch.cuda.get_device_properties(dev).total_memory, "peak_covers": covers}
    return {"peak_bytes": peak_resident_bytes(), "loaded_bytes": loaded, "peak_covers": covers}


def _resident_bytes() -> int:
    """Current resident set size (Linux ``VmRSS``; the peak elsewhere)."""
    return _status_bytes("VmRSS") or peak_resident_bytes()


def peak_resident_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` (resettable) on Linux, else ``ru_maxrss``."""
    found = _status_bytes("VmHWM")
    if found:
        return found

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux and BSD


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except OSError:  # no /proc: not Linux
        return None
    return None
