"""What a rank config costs on this machine, each measurement in a fresh child process: the processes
(``run_isolated``) and the figures taken from their rounds; what runs inside them is ``measuring.py``.

Every measurement runs in a process of its own, started from a process that holds no model and no tensor (spawned;
on the CPU forked from a fork server that has only imported torch, transformers and PEFT), so that

* the peak memory of a training step is that process's own: on CUDA the caching allocator's peak statistics, on
  the CPU the peak resident set size (Linux ``VmHWM``, reset after the model is loaded so that a transient of
  loading does not count; ``ru_maxrss`` elsewhere, which does include loading);
* gradient checkpointing on and off are measured in separate processes: one cannot inherit the other's cached
  allocator blocks or heap;
* a process killed for memory (signal 9), or an out-of-memory error (``torch.OutOfMemoryError``, ``MemoryError``,
  torch's CPU allocator refusing an allocation: ``measuring._is_out_of_memory``), is a result ("does not fit"), not a crash.

The fork server (CPU measurements, where the platform has one) saves each measurement after the first the ~5 s of
importing those libraries again (a check makes three). GPU measurements are spawned: a library that initializes CUDA
when imported (bitsandbytes) would leave a forked child unable to use it. A forked process's resident set counts the
libraries' code pages it touches, not every page a fresh import would have read: on a tiny model its peak read
~65 MiB lower than a spawned process's (376 against 441 MiB here; the rise above the loaded model alike, 20-26 MiB).

The model is built exactly as ``train_dynamic_lora`` builds it (``PEFTModelFactory``: the same dtype, quantization,
gradient checkpointing and LoRA dropout), and the training step is ``finetune.train_loop`` itself (the same
optimizer, precision, gradient clipping) on random token ids of exactly ``seq_len`` tokens.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import is_user_error
from ..settings import LoRATrainingSettings

__all__ = ["Target", "run_isolated", "latency_figures", "median_round", "TRAINING_STEPS", "GIB"]

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
_FORKSERVER_PRELOAD = ["lora_ranks.check._quiet", "torch", "transformers.modeling_utils", "peft",
                       "lora_ranks.check.measuring"]


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
        if is_user_error(value) or os.environ.get("LORA_RANKS_DEBUG") == "1":
            raise value
        # A library failing on this machine or these shapes (e.g. a bitsandbytes kernel on the CPU): the measurement
        # is impossible here, and the report says why (--debug raises it with its traceback instead).
        first = (str(value).strip().splitlines() or [""])[0]
        return {"impossible": f"the measurement failed: {type(value).__name__}: {first}"}
    return value


def _child(send, fn, args) -> None:
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

