"""The preflight's checks of the machine: Prefect's home and server, the training precision, and data-parallel
processes (the disk space for the outputs and the tokens left to train on read models: ``input_checks``)."""

from __future__ import annotations

# Prefect and httpx are imported by check_prefect_server, the preflight's last check: a bad option never waits for
# them.
import os
import shutil
from pathlib import Path

from flows.cli.commands import COMMANDS
from flows.options import flag_for
from lora_ranks.devices import resolve_device, resolve_precision
from lora_ranks.distributed import check_launchable
from lora_ranks.errors import LoraRanksError
from lora_ranks.outputs import probe_writable

PREFECT_HOME_SPACE = 64 * 2**20
"""Free bytes PREFECT_HOME needs before a flow starts: Prefect's SQLite database and its write-ahead log (about 16 MiB
after a day of runs here, 87 MiB with the test suite's), with room to grow."""


def check_prefect_home() -> None:
    """Prefect's home (PREFECT_HOME) is, or can be, a folder of its own with room for its database: read from the
    environment, without importing Prefect (importing it with a bad home waits and then fails), so the preflight
    asks it first."""
    home = os.environ.get("PREFECT_HOME")
    if home:  # read before Prefect is imported: importing it with a bad home waits and then fails
        path = Path(home).expanduser()
        existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(path.anchor))
        if not existing.is_dir():
            where = "is a file" if existing == path else f"lies under a file ({existing})"
            raise LoraRanksError(f"PREFECT_HOME {path} {where}, not a folder: point it at a folder (Prefect keeps its "
                                 "database there), or unset it")

        if not os.access(existing, os.W_OK | os.X_OK) or not probe_writable(existing):  # root passes access on /proc
            raise LoraRanksError(f"PREFECT_HOME {path} cannot be written (no folder can be created in {existing}): "
                                 "point it at a folder of yours, or unset it")
        free = shutil.disk_usage(existing).free
        if free < PREFECT_HOME_SPACE:  # Prefect's SQLite database; a full disk makes its server hang, then fail
            raise LoraRanksError(f"PREFECT_HOME {path} has {free / 2**20:,.0f} MiB free on its device: Prefect's "
                                 f"database needs about {PREFECT_HOME_SPACE // 2**20} MiB; free some space, or point "
                                 "PREFECT_HOME at another file system")


def check_prefect_server() -> None:
    """A server named by PREFECT_API_URL (the environment's or the Prefect profile's) answers: a bad setting ends
    here, not minutes into a flow."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        import httpx

        try:
            answer = httpx.get(url.rstrip("/") + "/health", timeout=5)
            why = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if why is not None:
            raise LoraRanksError(f"the Prefect server of PREFECT_API_URL {url} does not answer ({why}): start it "
                                 "(prefect server start), or unset PREFECT_API_URL to run on a temporary one")


def check_precision(command: str, settings: dict) -> None:
    """A bf16 precision asked for on hardware without bf16 units is refused, naming the flag, before anything loads.
    The device is the training's (CUDA when available, as the fine-tune and training choose it), or the one ``check``
    measures on (there only a CPU is asked here: on CUDA the measuring process checks it, so that this process
    creates no CUDA context)."""
    groups = [g for g in COMMANDS[command].groups if g.param in ("finetune", "training") and "precision" in g.field_names()]
    forced = [g for g in groups if settings[g.param].precision == "bf16"]
    if not forced:
        return

    device = resolve_device(settings["check"].device if command == "check" else None)
    if command == "check" and device != "cpu":
        return
    for group in forced:
        resolve_precision("bf16", device, flag=flag_for("precision", group.prefix))


def check_processes(command: str, settings: dict) -> None:
    """More than one training process (``processes``): accelerate is there, each process gets records of every
    micro-batch, a GPU each on GPUs; ``compare`` trains each row in one process (its rows are tasks of their own)."""

    for group in COMMANDS[command].groups:
        if group.param not in ("finetune", "training") or "processes" not in group.field_names():
            continue
        tune = settings[group.param]
        flag = flag_for("processes", group.prefix)
        if command == "compare" and group.param == "training" and tune.processes > 1:
            raise LoraRanksError(f"{flag} {tune.processes}: compare trains each row in one process (rows run as tasks "
                                 f"of their own); give {flag} to lora-ranks train")
        check_launchable(tune.processes, tune.batch_size, None, flag)


