"""The ``lora-ranks`` command line. Every subcommand but ``base``, ``extract`` and ``export`` runs a Prefect flow.

    lora-ranks demo [--vl]                           # whole pipeline on a tiny offline Qwen3 (or Qwen2.5-VL)
    lora-ranks analyze --base DIR --finetuned DIR --out DIR [--energy TAU ...]
    lora-ranks finetune --model DIR --data FILE --out DIR
    lora-ranks train --model DIR --lora-config FILE --data FILE --out DIR [--quantization 4bit]
    lora-ranks extract --base DIR --finetuned DIR --config FILE --out DIR     # plain library call, no Prefect
    lora-ranks compare --model DIR --data FILE --out DIR                      # the compare-allocations flow
    lora-ranks export ADAPTER_DIR --out DIR [--format uniform|merged]         # plain library call, no Prefect
    lora-ranks base smollm2-135m [--out DIR]                                  # a real base, float32 (no Prefect)
    lora-ranks check --model DIR --lora-config FILE [--batch 4 --seq-len 1024] [--max-train-memory-gb X]
                     [--max-infer-overhead 0.05] [--quantization 4bit] [--device cuda]   # the check-config flow

The options of each subcommand are generated from the settings classes the flow takes (``flows/options.py``).
Everything that can be checked before Prefect starts is: option values, the checkpoint pair's headers, the
rank config against the model, the dataset. Bad input ends with one ``lora-ranks: error: ...`` line and exit
status 2 (``--debug`` adds the traceback); ``check`` exits with status 1 when a budget does not hold. Without
PREFECT_API_URL the flows run on Prefect's ephemeral API (SQLite under PREFECT_HOME); with it, they report to
that server and show up in its UI.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

from flows import interrupts
from flows._runtime import apply_defaults
from flows.cli.commands import COMMANDS, FLOW_OF, output_of
from flows.cli.preflight import demo_inputs, run_preflight
from flows.cli.run import run_command
from flows.options import add_settings_options, settings_from_args
from lora_ranks.check import REPORT_NAME
from lora_ranks.check.verdict import CheckFailed, format_table
from lora_ranks.errors import is_user_error
from lora_ranks.locks import lock_file, output_lock
from lora_ranks.outputs import MARKER, record_made_entries
from lora_ranks.settings import INPUT_HELP

__all__ = ["main", "build_parser", "COMMANDS", "FLOW_OF", "run_preflight"]

_STOP_SERVER = False  # main() as the process's command: stop Prefect's temporary server before the last line


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``lora-ranks: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"lora-ranks: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-ranks", description="Per-module LoRA ranks from weight-delta spectra.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        for i in command.inputs:
            help = INPUT_HELP[i.help_key] + (f" (default: {i.default})" if i.default else "")
            if i.positional:
                p.add_argument(i.param, metavar=i.flag, help=help, **({} if i.required else {"nargs": "?"}))
            else:
                p.add_argument(i.flag, dest=i.param, required=i.required, default=i.default, help=help)
        for i in command.flags:
            p.add_argument(i.flag, dest=i.param, action="store_true", help=INPUT_HELP[i.help_key])
        for group in command.groups:
            add_settings_options(p, group)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input ends with one ``lora-ranks: error: ...`` line and exit status 2.

    Called as the command (``argv`` None: the process's own arguments), it stops Prefect's temporary server before
    it prints its last line; called with ``argv`` (tests, scripts running several commands in one process) it
    leaves the server running for the next one, to be stopped when the interpreter exits."""
    global _STOP_SERVER
    _STOP_SERVER = argv is None
    try:  # relative paths, and torch's own libraries, need it: checked before either is touched
        os.getcwd()
    except FileNotFoundError:
        print("lora-ranks: error: the current folder no longer exists (it was deleted while the shell was in it): cd "
              "to an existing folder and run the command again", file=sys.stderr)
        return 2
    if argv is None:  # the process's command: ^C and SIGTERM end it in one line, its children stopped
        interrupts.install()

    apply_defaults()  # Prefect's defaults, before anything (the preflight's Prefect check) imports Prefect
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["LORA_RANKS_DEBUG"] = "1"
    else:  # the temporary API server's own logs (its shutdown can cancel a flush mid-way) stay off the terminal
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        # bitsandbytes (imported with PEFT) warns on every import on CPUs with AVX-512 BF16 that an optional
        # kernel package is missing; it changes nothing here.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    new_output = None
    try:
        command = COMMANDS[args.command]
        inputs = {i.param: getattr(args, i.param) for i in (*command.inputs, *command.flags)}
        settings = {g.param: settings_from_args(args, g) for g in command.groups}
        if args.command == "demo":
            demo_inputs(inputs)
        run_preflight(args.command, inputs, settings)
        new_output = _new_output_dir(args.command, inputs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(output_lock(output_of(args.command, inputs), args.command))
            if _STOP_SERVER:
                out = output_of(args.command, inputs)
                interrupts.on_interrupt(lambda: lock_file(out).unlink(missing_ok=True))
                interrupts.on_interrupt(lambda: _remove_if_empty(new_output))
                if args.command in FLOW_OF:  # the flow's own hook does not run when the process exits here
                    interrupts.on_interrupt(lambda: record_made_entries(out))
                if args.command in FLOW_OF:
                    interrupts.isolate_prefect_server()
            lines = run_command(args.command, inputs, settings)
    except CheckFailed as exc:  # the check ran, and a budget does not hold: its table, then the failing lines
        _quiet_prefect_exit()
        print("\n" + format_table(exc.report) + f"\n\nReport:   {Path(args.output_dir).resolve() / REPORT_NAME}")
        print(f"lora-ranks: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        _remove_if_empty(new_output)
        if not is_user_error(exc) or args.debug:
            _quiet_prefect_exit()
            traceback.print_exc()
            if not is_user_error(exc):
                return 1
        _quiet_prefect_exit()
        print("lora-ranks: error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the message
        return 2
    except KeyboardInterrupt:
        print("lora-ranks: interrupted", file=sys.stderr)
        return 130
    _quiet_prefect_exit()
    print("\n" + "\n".join(lines))
    return 0


def _new_output_dir(command: str, inputs: dict) -> Path | None:
    """The command's output folder when this run is about to create it (None when it exists already)."""
    out = output_of(command, inputs)
    return None if out.exists() or out.is_symlink() else out.resolve()


def _remove_if_empty(folder: Path | None) -> None:
    """A run that failed leaves no output folder it created and filled with nothing but its marker."""
    if folder is not None and folder.is_dir() and not any(p.is_file() and p.name != MARKER for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)  # only the marker and empty folders: nothing of the run's to keep


def _quiet_prefect_exit() -> None:
    """Stop Prefect's temporary API server now, quietly, so that nothing it prints lands after the command's last
    line (the error, or where the results are). It would otherwise be stopped at interpreter exit, after that line,
    with an INFO goodbye on the ``prefect`` logger; ``stop`` waits (5 s at most) for the process to end."""
    server = sys.modules.get("prefect.server.api.server")
    if server is None or not _STOP_SERVER:  # no server started, or another command of this process may need it
        return  # (and that process's Prefect logging is left as it is)
    logging.getLogger("prefect").setLevel(logging.WARNING)
    # Send the run's last logs and events first (as prefect.testing's harness does before it stops its server).
    for module, worker in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        service = getattr(sys.modules.get(module), worker, None)
        if service is not None:
            with contextlib.suppress(Exception):  # never started, or already drained
                service.drain_all(timeout=5)
    if not os.environ.get("LORA_RANKS_DEBUG"):  # what it logs about the requests its shutdown cancels: nothing
        interrupts.silence_children()  # the user can act on (with --debug, everything it says is shown)
    for instance in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
        with contextlib.suppress(Exception):  # already stopped, or gone: nothing left to print
            instance.stop()


if __name__ == "__main__":
    sys.exit(main())

