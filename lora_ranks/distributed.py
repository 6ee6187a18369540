"""Data-parallel training in several processes: the brief fine-tune and LoRA training under ``accelerate launch``.

With ``TrainingSettings.processes`` N > 1, ``finetune.run_preliminary_finetune`` and ``train.train_dynamic_lora``
hand their call to :func:`launch`, which runs ``accelerate launch --num_processes N -m lora_ranks.distributed
REQUEST`` and waits: the caller (a Prefect task, a script) sees one call returning one result, as with one process.
In every process ``accelerate.PartialState`` joins the process group (gloo on CPUs, NCCL on GPUs, one GPU per
process) and the same call runs again, now inside the group:

* ``finetune.train_loop`` wraps the model in ``DistributedDataParallel``. Every process draws the same data order
  (the seed), and each optimizer step's micro-batch of ``batch_size`` records (the *global* batch) is dealt across
  the processes (record i to process i mod N). Each process scales its loss so that the all-reduced gradient is
  that of the global batch's mean over its label tokens, as one process computes it: the loss curve is the
  one-process curve with the same ``batch_size``, up to float reduction order (tests/test_distributed.py).
* Only process 0 writes (checkpoints, adapters, metrics, the result for :func:`launch`) and reports progress.

FSDP (a model that does not fit one device) is not lora-ranks' loop: train the ranks in TRL or the Trainer under
``accelerate launch --use_fsdp`` (``lora_ranks.lora_config``; docs/trainers.md, docs/orchestration.md).
"""

from __future__ import annotations

# torch.distributed and accelerate are imported by a launch or its processes: finetune and train import this module
# for should_launch, which one process answers without them.
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .errors import LoraRanksError
from .progress import LOGGER

ENTRY = "lora_ranks.distributed"
PROGRESS_PREFIX = "lora-ranks progress: "
"""How process 0 of a launch marks its progress lines on stderr (the launching process logs them)."""


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the initialized process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """This process writes outputs: the only one, or rank 0 of the group."""
    return world()[0] == 0


def wait_for_everyone() -> None:
    """A barrier across the group's processes (nothing without one)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def should_launch(processes: int) -> bool:
    """``processes`` > 1 asked for and this process is not yet one of them."""
    return processes > 1 and world()[1] == 1 and "LORA_RANKS_DISTRIBUTED_CHILD" not in os.environ


def check_launchable(processes: int, batch_size: int, device: str | None, flag: str = "--processes") -> None:
    """Before any work: accelerate is installed, every process gets records of each micro-batch, and on GPUs there
    is one per process.

    Raises:
        LoraRanksError: naming the flag and what to change.
    """
    if processes <= 1:
        return
    if importlib.util.find_spec("accelerate") is None:
        raise LoraRanksError(f"{flag} {processes} runs the training under accelerate launch, which is not installed: "
                             "pip install accelerate (a dependency of lora-ranks and peft that this environment lacks)")
    if batch_size < processes:
        raise LoraRanksError(f"{flag} {processes} deals each micro-batch across the processes, but the batch size is "
                             f"{batch_size}: give a batch size of at least {processes} (it is the global batch)")
    import torch

    use_cuda = device != "cpu" and (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if use_cuda and torch.cuda.device_count() < processes:
        raise LoraRanksError(f"{flag} {processes} needs one GPU per process; {torch.cuda.device_count()} visible")


def launch(function: str, kwargs: dict, processes: int, *, cpu: bool):
    """Run ``function`` ("finetune" or "train": ``run_preliminary_finetune`` / ``train_dynamic_lora``) with
    ``kwargs`` in ``processes`` data-parallel processes (``accelerate launch``); its result, as process 0 returned it.

    ``kwargs`` are JSON-able (paths as strings; ``settings`` as its ``to_dict()``). A process that fails fails the
    launch: its error line is raised here (``LoraRanksError``), the other processes are stopped by accelerate.
    """
    with tempfile.TemporaryDirectory(prefix="lora-ranks-launch-") as tmp:
        request = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        request.write_text(json.dumps({"function": function, "kwargs": kwargs, "result": str(result), "cpu": cpu}))
        # --multi_gpu is accelerate's torchrun launcher, for CPUs too (its --cpu starts one process without MPI);
        # on CPUs the processes then join with PartialState(cpu=True): gloo
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", ENTRY, str(request)]
        env = {**os.environ, "LORA_RANKS_DISTRIBUTED_CHILD": "1", "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))}
        errors, tail = [], []
        # Both streams read here (nothing of the processes' own output, e.g. transformers' bars, reaches the
        # terminal): process 0's progress into this process's log, error lines kept for the message.
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
            for line in child.stdout:
                line = line.rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    LOGGER.info(line.removeprefix(PROGRESS_PREFIX))
                elif line.startswith("lora-ranks: error: "):
                    errors.append(line.removeprefix("lora-ranks: error: "))
                else:
                    tail = (tail + [line])[-40:]
            returncode = child.wait()
        if returncode != 0 or not result.is_file():
            detail = errors[0] if errors else "\n".join(tail)
            raise LoraRanksError(f"the {processes}-process {function} failed (exit {returncode}): {detail}")
        return _result(function, json.loads(result.read_text()))


# What each launchable function is: (module, function, its settings class in lora_ranks.settings, its result class).
# Named, not imported: finetune and train import this module to launch themselves.
_CALLS = {
    "finetune": ("lora_ranks.finetune", "run_preliminary_finetune", "FinetuneSettings", "FinetuneResult"),
    "train": ("lora_ranks.train", "train_dynamic_lora", "LoRATrainingSettings", "TrainResult"),
}


def _resolve(function: str, part: int):
    """The function, settings class or result class (``part`` 1, 2, 3) of launchable ``function``."""
    module = _CALLS[function][0] if part != 2 else "lora_ranks.settings"
    return getattr(importlib.import_module(module), _CALLS[function][part])


def _result(function: str, fields: dict):
    return _resolve(function, 3)(**fields)


def _run(request: dict) -> None:
    """One process of a launch: join the group, run the call, and (process 0) write its result."""

    from accelerate import PartialState

    state = PartialState(cpu=request["cpu"])  # joins the group accelerate launch set up (gloo on CPUs, else NCCL)
    if state.is_main_process:  # progress lines to the launching process (lora_ranks.progress)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PROGRESS_PREFIX + "%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False
    kwargs = dict(request["kwargs"])
    kwargs["device"] = "cpu" if request["cpu"] else str(state.device)
    kwargs["progress"] = False
    kwargs["settings"] = _resolve(request["function"], 2)(**kwargs["settings"])
    result = _resolve(request["function"], 1)(**kwargs)
    if state.is_main_process:
        Path(request["result"]).write_text(json.dumps(asdict(result)))
    state.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        _run(json.loads(Path(argv[0]).read_text()))
    except LoraRanksError as exc:
        print(f"lora-ranks: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
