"""What a rank config costs on this machine, each measurement in a fresh child process.

Every measurement runs in a process of its own, started from a process that holds no model and no tensor (spawned;
on the CPU forked from a fork server that has only imported torch, transformers and PEFT), so that

* the peak memory of a training step is that process's own: on CUDA the caching allocator's peak statistics, on
  the CPU the peak resident set size (Linux ``VmHWM``, reset after the model is loaded so that a transient of
  loading does not count; ``ru_maxrss`` elsewhere, which does include loading);
* gradient checkpointing on and off are measured in separate processes: one cannot inherit the other's cached
  allocator blocks or heap;
* a process killed for memory (signal 9), or an out-of-memory error (``torch.OutOfMemoryError``, ``MemoryError``,
  torch's CPU allocator refusing an allocation: ``_is_out_of_memory``), is a result ("does not fit"), not a crash.

The fork server (CPU measurements, where the platform has one) saves each measurement after the first the ~5 s of
importing those libraries again (a check makes three). GPU measurements are spawned: a library that initializes CUDA
when imported (bitsandbytes) would leave a forked child unable to use it.

The model is built exactly as ``train_dynamic_lora`` builds it (``PEFTModelFactory``: the same dtype, quantization,
gradient checkpointing and LoRA dropout), and the training step is ``finetune.train_loop`` itself (the same
optimizer, precision, gradient clipping) on random token ids of exactly ``seq_len`` tokens.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..settings import LoRATrainingSettings

__all__ = ["Target", "run_isolated", "measure_training_step", "measure_inference", "latency_figures", "median_round",
           "peak_resident_bytes"]

#: Training steps a check measures: the first also creates the optimizer state; the last is timed.
TRAINING_STEPS = 2
GIB = 2**30


@dataclass(frozen=True)
class Target:
    """What is measured: a base model with a rank config's LoRA, built as training builds it, on ``device``.

    Attributes:
        model: base model folder or hub id.
        rank_config: path of ``lora_rank_config.json``.
        device: "cpu", "cuda" or "cuda:N" (already checked to exist).
        quantization: None, "4bit" or "8bit" (bitsandbytes).
        optimizer: "adamw" or "adamw8bit", as training's settings say.
        lora_dropout: as training's settings say.
        trust_remote_code: as the safety settings say.
        precision: "auto", "bf16" or "float32", as training's settings say (resolved on ``device``).
    """

    model: str
    rank_config: str
    device: str
    quantization: str | None = None
    optimizer: str = LoRATrainingSettings.model_fields["optimizer"].default
    lora_dropout: float = LoRATrainingSettings.model_fields["lora_dropout"].default
    trust_remote_code: bool = False
    precision: str = LoRATrainingSettings.model_fields["precision"].default

    def to_dict(self) -> dict:
        return asdict(self)


#: What the CPU measurements' fork server imports once (``_quiet`` first: it quiets what the others read at import).
_FORKSERVER_PRELOAD = ["lora_ranks.check._quiet", "torch", "transformers.modeling_utils", "peft", "lora_ranks.model",
                       "lora_ranks.training_loop"]


def _process_context(on_cpu: bool):
    if on_cpu and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def run_isolated(fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)`` in a fresh process (forked from the fork server when every ``Target`` in ``args`` is on the CPU,
    else spawned); its result dict, or ``{"impossible": why}`` when the process died (e.g. killed by the kernel for
    memory) or a library failed in it. The project's own errors raised in the child are re-raised here."""
    ctx = _process_context(all(a.device == "cpu" for a in args if isinstance(a, Target)))
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    process.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:  # the child died without answering
        process.join(30)
        code = process.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        hint = " (out of memory?)" if code == -9 else ""
        return {"impossible": f"the measuring process died: {why}{hint}"}
    finally:
        receive.close()
    process.join(30)
    if kind == "error":
        import os

        from ..errors import is_user_error

        if is_user_error(value) or os.environ.get("LORA_RANKS_DEBUG") == "1":
            raise value
        # A library failing on this machine or these shapes (e.g. a bitsandbytes kernel on the CPU): the measurement
        # is impossible here, and the report says why (--debug raises it with its traceback instead).
        first = (str(value).strip().splitlines() or [""])[0]
        return {"impossible": f"the measurement failed: {type(value).__name__}: {first}"}
    return value


def _child(send, fn, args) -> None:
    import signal

    from . import _quiet  # noqa: F401 - imported for its settings (the fork server has imported it already)

    # A ^C to the terminal's process group is the parent's to handle: it stops this process by PID (no traceback here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        result = ("error", exc)
    try:
        send.send(result)
    except Exception as exc:  # an exception that does not pickle
        send.send(("error", RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({exc})")))
    send.close()


def measure_training_step(target: Target, batch: int, seq_len: int, gradient_checkpointing: bool,
                          steps: int = TRAINING_STEPS) -> dict:
    """Peak memory and time of ``steps`` training steps (forward, backward, optimizer step) at batch x seq_len.

    Run it through ``run_isolated``. Returns ``peak_bytes`` (the figure budgets are checked against: CUDA peak
    reserved / CPU peak resident), ``peak_allocated_bytes`` (CUDA), ``device_total_bytes`` (CUDA),
    ``loaded_bytes`` (resident memory once the model is built, CPU), ``step_seconds`` (the last step: the
    first also creates the optimizer state), ``tokens_per_s``, ``peak_covers`` (what the peak includes); or
    ``out_of_memory`` with the message.
    """
    import torch

    from ..finetune import train_loop
    from ..settings import TrainingSettings

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
    import torch

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


def latency_figures(rounds: dict[str, dict[str, list[float]]]) -> dict:
    """The timing fields of ``measure_inference`` (see there) from the raw rounds.

    Args:
        rounds: "unmerged" and "merged" -> ``{"base_ms": [...], "adapter_ms": [...]}``, per-round forward times
            (ms), the same number of rounds (>= 1) in each list.
    """
    figures: dict = {"base_ms": statistics.median(rounds["unmerged"]["base_ms"] + rounds["merged"]["base_ms"])}
    for phase in ("unmerged", "merged"):
        base_ms, adapter_ms = rounds[phase]["base_ms"], rounds[phase]["adapter_ms"]
        median = median_round(base_ms, adapter_ms)
        figures |= {f"{phase}_overhead": adapter_ms[median] / base_ms[median] - 1,
                    f"{phase}_ms": adapter_ms[median], f"{phase}_base_ms": base_ms[median]}
    return {**figures, "rounds": rounds}


def median_round(base_ms: list[float], adapter_ms: list[float]) -> int:
    """The index of the round whose ratio ``adapter_ms[i] / base_ms[i]`` is the median of the per-round ratios (the
    upper median for an even count: a ratio one round measured, so the times beside it are the ones it came from).

    Args:
        base_ms, adapter_ms: per-round forward times (ms) of the base and the adapter model, the same length >= 1.
    """
    if not base_ms or len(base_ms) != len(adapter_ms):
        raise ValueError(f"median_round needs as many base as adapter rounds, at least one: got {len(base_ms)} base "
                         f"and {len(adapter_ms)} adapter times")
    by_ratio = sorted(range(len(base_ms)), key=lambda i: adapter_ms[i] / base_ms[i])
    return by_ratio[len(by_ratio) // 2]


def _build(target: Target, dev, gradient_checkpointing: bool, with_lora: bool):
    """The base model (``with_lora=False``) or the PEFT model training builds, on ``dev``."""

    from ..model import DynamicLoRAConfig, PEFTModelFactory

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
    from ..devices import resolve_precision
    from ..train import training_dtype

    return training_dtype(resolve_precision(precision, dev))


def _device_name(dev) -> str:
    import os
    import platform

    import torch

    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _interleaved(base, other, tokens, repeats: int) -> dict:
    """Forward times (ms) of ``base`` and ``other`` over ``repeats`` rounds after a warm-up round; each round runs
    both, in alternating order, so that drifting load or caches favour neither. Returns ``{"base_ms": [...],
    "adapter_ms": [...]}``, ``repeats`` floats each, in round order (``other`` is the adapter model)."""
    import torch

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
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return type(exc) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none (a bare ``MemoryError()``)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _synced_clock(dev) -> float:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _reset_peaks(dev) -> str:
    """Reset the peak-memory statistics after loading; returns what the peak will cover."""
    import torch

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
    import torch

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
    import resource

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
