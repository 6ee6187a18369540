"""Everything ``lora-ranks`` checks before Prefect starts (``run_preflight``): the output folder first (nothing of the
user's is overwritten), then the device, the inputs and the numbers that depend on them. Each check raises the
project's error types, which the command line prints as one line (exit status 2)."""

from __future__ import annotations

from pathlib import Path

from flows.cli.commands import COMMANDS, DEMO_OUT, DEMO_VL_OUT, FLOW_OF, OUTPUT_PARAMS
from flows.cli.environment import check_precision, check_prefect_home, check_processes
from lora_ranks.analysis.plan import AnalysisPlan
from lora_ranks.bases import KNOWN_BASES, BaseModelError, check_gguf_file, default_base_dir, known_base_paths, make_base
from lora_ranks.devices import resolve_device
from lora_ranks.outputs import RUN_ENTRIES, check_output_dir
from lora_ranks.settings import (
    FinetuneSettings,
    SafetySettings,
)
from lora_ranks.synthetic import DEMO_BASE


def run_preflight(command: str, inputs: dict, settings: dict) -> None:
    """Everything that can be checked before Prefect starts (it raises the project's error types): the output folder
    first (nothing of the user's is overwritten), then the device, the inputs and the numbers that depend on them."""
    if command == "base":
        _base_inputs(inputs)
    _check_output(command, inputs, settings)
    if command in FLOW_OF:  # Prefect's home, read from the environment: no import
        check_prefect_home()
    if command == "demo" and inputs.get("demo_base"):  # made (or found in the cache) before Prefect starts
        inputs["demo_base_dir"] = str(make_base(inputs["demo_base"]).path)
    plan = _analysis_plan(command, inputs, settings)
    if plan is not None and command != "demo":  # the demo builds its data in the flow
        plan.check_inputs()  # the data the steps need (before any heavy import), then the device
    elif "analysis" in settings:
        resolve_device(settings["analysis"].device)
    check_precision(command, settings)
    check_processes(command, settings)
    # The checks that need torch (checkpoints, configs, tokenizers, records), imported only now: a bad option or
    # output folder is answered above in well under a second, without it.
    from flows.cli.input_checks import check_inputs_and_models

    check_inputs_and_models(command, inputs, settings, plan)


def demo_inputs(inputs: dict) -> None:
    """``demo``: the output folder of the kind asked for (``--vl``, ``--base NAME``) unless one is given; a real
    base must be a known one, and not with ``--vl``."""
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
    spec = COMMANDS[command]
    out_param = next(i.param for i in spec.inputs if i.param in OUTPUT_PARAMS)
    out = inputs[out_param]
    given = [(i.flag, inputs[i.param]) for i in spec.inputs
             if i.param not in OUTPUT_PARAMS and i.param not in ("name", "demo_base")]  # names, not paths: below
    if command in ("base", "demo"):  # a known base is its cache folder and, when installed, its wheel's file
        name = inputs.get("name") or inputs.get("demo_base")
        given += [(f"the base {name}", path) for path in known_base_paths(name)
                  if command == "demo" or path != default_base_dir(name)]  # base NAME may write its cache folder
    flag = "the base cache folder (LORA_RANKS_CACHE)" if command == "base" and inputs.get("default_out") else "--out"
    model = command == "base" or (command == "export" and settings["export"].format == "merged")
    check_output_dir(out, inputs=given, overwrite=inputs["overwrite"], flag=flag,
                     folder_output=command in ("extract", "export", "base"), folder_content="model" if model else "adapter",
                     entries=RUN_ENTRIES.get(FLOW_OF.get(command, ""), ()))


def _analysis_plan(command: str, inputs: dict, settings: dict):
    """The ``AnalysisPlan`` the command's flow will run (None for commands without an analysis, and for the
    vision-language demo, whose base the flow builds)."""
    if "allocation" not in settings:
        return None
    base = inputs.get("base_model")
    if command == "demo":
        if inputs.get("vl"):
            return None

        base = inputs["demo_base_dir"] if inputs.get("demo_base") else DEMO_BASE

    safety = settings.get("safety", SafetySettings())
    return AnalysisPlan(base, inputs.get("finetuned_model"), inputs.get("data_path"), allocation=settings["allocation"],
                        alpha=settings["alpha"], analysis=settings["analysis"], curvature=settings["curvature"],
                        finetune=settings.get("finetune", FinetuneSettings()), allow_pickle=safety.allow_pickle,
                        trust_remote_code=safety.trust_remote_code)
