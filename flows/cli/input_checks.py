"""The preflight's second half: the checks that read checkpoints, configs, tokenizers and records (they need torch
and transformers). ``preflight.run_preflight`` imports this module only once the options and the output folder
passed, so a bad option is answered without torch. Every check raises the project's error types (one line, exit
status 2); the order below is the order a user is told of problems: the data first, then the models, then the room
and the tokens, Prefect last."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from flows.cli.environment import check_prefect_server
from flows.options import flag_for
from lora_ranks.check import check_inputs
from lora_ranks.checkpoints import Checkpoint, CheckpointError, CheckpointPair, build_meta_model, resolve_model_path
from lora_ranks.checkpoints.naming import is_vision_stack
from lora_ranks.config import check_config_matches_model, load_rank_config
from lora_ranks.data import check_vision_records, load_records, stratified_subset
from lora_ranks.errors import DiskFullError, LoraRanksError
from lora_ranks.evidence.comparison import check_comparison_data
from lora_ranks.evidence.fidelity import check_report_data
from lora_ranks.evidence.peers import check_peers
from lora_ranks.evidence.runs import check_results_dir
from lora_ranks.export import check_export
from lora_ranks.finetune import check_step_fits, check_trainable_tokens
from lora_ranks.loading import load_image_processor
from lora_ranks.outputs import RUN_ENTRIES, check_output_dir
from lora_ranks.serving import read_adapter
from lora_ranks.synthetic import DEMO_MODEL
from lora_ranks.train import warm_start_source

from .commands import COMMANDS, FLOW_OF, output_of

__all__ = ["check_inputs_and_models"]

_TRAINS = ("finetune", "train", "compare")  # the commands that train, on records they read


def check_inputs_and_models(command: str, inputs: dict, settings: dict, plan) -> None:
    """Every check of ``command``'s inputs that reads files, after the light ones; ``plan`` is its
    ``AnalysisPlan`` (None without an analysis)."""
    _check_data(command, inputs, settings)
    _check_compare_settings(command, inputs, settings)
    for key in ("data_path", "eval_data_path"):  # read now, not after a fine-tune or an analysis
        if inputs.get(key) and (key == "eval_data_path" or command == "analyze"):
            load_records(inputs[key])
    if plan is not None and plan.finetuned is not None:  # analyze, or compare on a given pair
        plan.check_pair(read_weights=True)
        plan.check_calibration()
    elif plan is not None:  # compare or demo: the pair is still to be fine-tuned
        plan.check_before_finetune()
        if command == "compare":  # the calibration records, with the base's tokenizer (the fine-tune copies it)
            plan.check_calibration()
    _check_models(command, inputs, settings)
    model = inputs.get("model") or inputs.get("base_model")
    if command in _TRAINS and model != DEMO_MODEL:
        _check_tokenizer(model)  # the other checks name a cause first
    _check_space(command, inputs, settings)
    if command in _TRAINS:  # after the checks that name a cause: tokenizes records
        _check_trainable_tokens(command, inputs, settings)
    if command in FLOW_OF:  # last: it imports Prefect (2 s), which a bad option never waits for
        check_prefect_server()


def _check_data(command: str, inputs: dict, settings: dict) -> None:
    """The records: the fidelity report's, compare's committed results and held-out data, and every training record
    (with its images), which a training step must fit in."""
    if command == "analyze":
        check_report_data(settings["fidelity"], inputs.get("data_path"), inputs.get("eval_data_path"))
    if command == "compare" and inputs.get("results_dir"):  # committed results: the tool's, in a folder
        check_results_dir(inputs["results_dir"])
    if command == "compare":  # held-out and validation records disjoint from training; a subset of a batch or more
        check_comparison_data(inputs["data_path"], inputs["eval_data_path"], inputs["validation_data_path"],
                              settings["comparison"], None if inputs["finetuned_model"] else settings["finetune"])
    if command not in _TRAINS:
        return
    records = load_records(inputs["data_path"])  # every record (and image), with file:line on the first bad one
    _check_steps_fit(command, records, settings)
    model = inputs.get("model") or inputs["base_model"]
    if model != DEMO_MODEL and any("images" in r for r in records):  # loads the processor only when needed
        check_vision_records(records, load_image_processor(model), f"{inputs['data_path']} (for {model})")
    for group in ("finetune", "training"):
        if group in settings and settings[group].wandb_project and importlib.util.find_spec("wandb") is None:
            raise LoraRanksError("--wandb-project is set but wandb is not installed: pip install wandb (or leave "
                                 "--wandb-project unset)")


def _check_steps_fit(command: str, records: list[dict], settings: dict) -> None:
    """A training step fits in the records it trains on (``finetune.check_step_fits``): the fine-tune's on its
    stratified subset, a LoRA's on every record."""
    if "finetune" in settings and command in ("finetune", "compare"):
        tune = settings["finetune"]
        subset, _ = stratified_subset(records, tune.subset_ratio, tune.max_samples, seed=tune.seed,
                                      task_key=tune.task_key)
        check_step_fits(len(subset), tune, "the brief fine-tune")
    if "training" in settings and command in ("train", "compare"):
        check_step_fits(len(records), settings["training"], "LoRA training")


def _check_compare_settings(command: str, inputs: dict, settings: dict) -> None:
    """compare's budget ranks within --max-rank, and its PEFT peers available for the model's layer types."""
    if command != "compare":
        return
    comparison = settings["comparison"]
    too_big = [r for r in comparison.budget_ranks if r > settings["allocation"].max_rank]
    if too_big:
        raise LoraRanksError(f"--budget-ranks {too_big[0]} is above --max-rank {settings['allocation'].max_rank}: "
                             "no allocation could spend it; give budget ranks up to --max-rank")
    if not comparison.peers:
        return
    model = inputs.get("model") or inputs["base_model"]
    types = None
    if model != DEMO_MODEL:  # the demo's model is a Qwen3: linear layers
        targets = settings["analysis"].targets
        types = {name: type(module).__name__ for name, module in build_meta_model(resolve_model_path(model)).named_modules()
                 if targets.selects(name, is_vision_stack(name)) and hasattr(module, "weight")}
    check_peers(comparison.peers, quantization=settings["training"].quantization, module_types=types)


def _check_models(command: str, inputs: dict, settings: dict) -> None:
    """The model folders and rank configs each command reads: they exist, fit each other, and (train) the warm
    start's source is a fine-tuned model, not the base."""
    if command in ("finetune", "compare"):
        resolve_model_path(inputs.get("model") or inputs["base_model"])
    if command == "export":
        check_export(inputs["adapter_dir"], settings["export"], inputs["base"], inputs["out_dir"], inputs["overwrite"])
    if command == "extract":
        load_rank_config(inputs["rank_config_path"])
        pair = CheckpointPair(inputs["base"], inputs["finetuned"], allow_pickle=settings["safety"].allow_pickle)
        if pair.base.root == pair.finetuned.root:
            raise CheckpointError(f"--base and --finetuned are the same folder ({pair.base.root}): the delta is zero, "
                                  "so the adapter would be all zeros; give the fine-tuned model as --finetuned")
    if command == "check":
        check_inputs(inputs["model"], inputs["rank_config"], settings["check"], settings["training"],
                     settings["safety"].trust_remote_code)
    if command == "train":
        _check_warm_start(inputs, settings)


def _check_warm_start(inputs: dict, settings: dict) -> None:
    """train: the rank config fits the model, and the warm start's source loads and is not the base itself."""
    rank_config = load_rank_config(inputs["rank_config"])
    check_config_matches_model(rank_config, resolve_model_path(inputs["model"]))
    source = warm_start_source(rank_config, inputs["warm_start_from"], settings["training"].init)
    if source is None:
        return
    flag = "--warm-start-from" if inputs["warm_start_from"] else "the rank config's fine-tuned model"
    try:
        Checkpoint(source)
    except CheckpointError as exc:
        raise CheckpointError(f"{flag}: {exc}") from None
    check_output_dir(inputs["output_dir"], inputs=[(flag, source)], overwrite=inputs["overwrite"],
                     entries=RUN_ENTRIES["train-dynamic-lora"])
    if resolve_model_path(source) == resolve_model_path(inputs["model"]):
        raise CheckpointError(f"{flag} {source} is the base model itself: its delta is zero, so the warm start "
                              "would be an all-zero adapter; give the fine-tuned model, or --init cold")


def _check_tokenizer(model: str) -> None:
    """A model that is trained needs a tokenizer that loads and fits its vocabulary (ids past the embedding would
    end the run in an IndexError)."""
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


def _check_space(command: str, inputs: dict, settings: dict) -> None:
    """The output's file system has room for the models the command writes (a fine-tuned model in float32, a merged
    model in its base's dtype); smaller outputs are not estimated. A disk that fills up anyway ends the command in one
    line, with nothing half-written kept (``lora_ranks._io``)."""
    if command == "finetune" and inputs["model"] != DEMO_MODEL:
        model, bytes_per_value = inputs["model"], 4  # training, and the saved model, are float32 on the CPU
    elif command == "export" and settings["export"].format == "merged":
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
    out = Path(os.path.abspath(output_of(command, inputs)))
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


def _check_trainable_tokens(command: str, inputs: dict, settings: dict) -> None:
    """Some record keeps a response token within each training's max length (``finetune.check_trainable_tokens``)."""
    model = inputs.get("model") or inputs["base_model"]
    if model == DEMO_MODEL:
        return
    records = load_records(inputs["data_path"])
    for group in COMMANDS[command].groups:
        if group.param in ("finetune", "training") and "max_length" in group.field_names():
            check_trainable_tokens(records, model, settings[group.param].max_length,
                                   flag_for("max_length", group.prefix), inputs["data_path"])
