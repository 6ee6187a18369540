"""Everything ``lora-ranks`` checks before Prefect starts (``run_preflight``): the output folder first (nothing of the
user's is overwritten), then the device, the inputs and the numbers that depend on them. Each check raises the
project's error types, which the command line prints as one line (exit status 2)."""

from __future__ import annotations

from pathlib import Path

from flows.cli.commands import COMMANDS, DEMO_OUT, DEMO_VL_OUT, FLOW_OF, OUTPUT_PARAMS
from flows.cli.environment import check_precision, check_prefect, check_processes, check_space, check_trainable_tokens
from lora_ranks.settings import (
    FinetuneSettings,
    SafetySettings,
)


def run_preflight(command: str, inputs: dict, settings: dict) -> None:
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
    check_precision(command, settings)
    check_processes(command, settings)
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
    check_space(command, inputs, settings)
    if command in ("finetune", "train", "compare"):  # after the checks that name a cause: tokenizes records
        check_trainable_tokens(command, inputs, settings)
    if command in FLOW_OF:  # last: it imports Prefect (2 s), which a bad option never waits for
        check_prefect()


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


def demo_inputs(inputs: dict) -> None:
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
    out_param = next(i.param for i in spec.inputs if i.param in OUTPUT_PARAMS)
    out = inputs[out_param]
    given = [(i.flag, inputs[i.param]) for i in spec.inputs
             if i.param not in OUTPUT_PARAMS and i.param not in ("name", "demo_base")]  # names, not paths: below
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
