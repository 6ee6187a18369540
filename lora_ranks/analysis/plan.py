"""One analysis as data: its inputs and settings, the checks before any work, its steps, and what it records.

``AnalysisPlan`` is what every way of running an analysis executes: ``analyze_checkpoints`` (serially, in one
process), the ``svd-analysis`` flow (one task per step, layers fanned out) and the command line's preflight (the
checks only, before Prefect starts). So a check has one message and one exception type wherever it fails, the
calibration records are tokenized by the same model's tokenizer, and both paths record the same timings.

Steps, in order (the flow's ``# Step`` comments follow them)::
    check_inputs            the device; the data a curvature spectrum, the split-half estimate or a fine-tune needs
    check_calibration       the calibration records tokenize to enough tokens (curvature spectra)
    check_before_finetune   rank bounds and budget against the base (when the pair is still to be fine-tuned)
    check_pair              every problem the pair's headers show, bounds, budget (and NaN / identical weights)
    collect_curvature       K-FAC factors from the fine-tuned model, one file per layer (curvature spectra)
    analyze_layer           one layer's spectra (the unit of parallel work)
    split_half_finetunes    two more fine-tunes on halves of the subset (the split-half noise estimate)
    split_half_ranks        per module, the directions the two halves' deltas share
    assemble                ranks and the rank config, with ``metadata`` (settings, curvature record, timings)
"""

from __future__ import annotations

# The steps import what they run (torch, transformers, the spectra): the command line builds a plan and checks its
# inputs before any of them is imported, so that a bad input is answered in well under a second.
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Light imports only (no torch): the command line checks a plan's inputs before any heavy import; the steps import
# what they run.
from ..data import DataError
from ..devices import resolve_device
from ..errors import CalibrationError
from ..settings import AllocationSettings, AlphaPolicy, AnalysisSettings, CurvatureSettings, FinetuneSettings, NoiseEstimate
from ..spectra.kind import SpectrumKind

if TYPE_CHECKING:
    from ..checkpoints import ModuleRef
    from ..config import RankConfig, Timings
    from .curvature import CurvatureResult
    from .layer import LayerResult
    from .split_half import SplitHalfModule

__all__ = ["AnalysisPlan", "StepClock"]

_CALIBRATION_CHECKED: dict[tuple, int] = {}  # (plan, data file, tokenizer file) -> calibration records


def _file_identity(path: str | Path) -> tuple:
    """(path, size, modification time in ns) of a file, or (path,) when it cannot be read: a cache key that a
    changed file misses."""
    try:
        info = Path(path).stat()
    except OSError:
        return (str(path),)
    return (str(Path(path).resolve()), info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class AnalysisPlan:
    """An analysis of a checkpoint pair (or of a base still to be fine-tuned on ``data_path``).

    Attributes:
        base: the pretrained model (a local folder or hub id).
        finetuned: the fine-tuned model folder; None while the brief fine-tune has not run.
        data_path: the fine-tuning records, also the calibration records of curvature spectra.
        curvature: made concrete on construction (``spectrum`` "auto" resolves by whether data is given).
        allow_full_rank: accept a ``min_rank`` at or above every module's full rank (the library's exact-extraction
            references); the command line and the flow refuse it.
    """

    base: str
    finetuned: str | None = None
    data_path: str | None = None
    allocation: AllocationSettings = AllocationSettings()
    alpha: AlphaPolicy = AlphaPolicy()
    analysis: AnalysisSettings = AnalysisSettings()
    curvature: CurvatureSettings = CurvatureSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    allow_pickle: bool = False
    trust_remote_code: bool = False
    allow_full_rank: bool = False

    def __post_init__(self) -> None:
        for name in ("base", "finetuned", "data_path"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        object.__setattr__(self, "curvature", self.curvature.resolved(self.data_path is not None))

    @property
    def spectrum(self) -> SpectrumKind:
        """The spectrum the ranks are read from (auto already resolved)."""
        return SpectrumKind(self.curvature.spectrum)

    def with_pair(self, base: str | Path, finetuned: str | Path) -> AnalysisPlan:
        """This plan once the brief fine-tune has produced the pair."""
        return dataclasses.replace(self, base=str(base), finetuned=str(finetuned))

    # -- checks: before any work, one message and one exception type each ----------------------------------------

    def check_inputs(self) -> None:
        """The device, and the data every step that needs it has.

        Raises:
            DeviceError: the device is not there.
            CalibrationError: a curvature spectrum, or the split-half noise estimate, without the fine-tuning data.
            DataError: no finetuned model and no data to fine-tune on; a fine-tuning subset too small to split in
                two for the split-half noise estimate.
        """
        if self.data_path is None:
            self._check_data()
        elif self.allocation.noise_estimate is NoiseEstimate.SPLIT_HALF:  # two halves of the subset, known before any fine-tune
            from ..finetune import split_half_records

            split_half_records(self.data_path, self.finetune)

        resolve_device(self.analysis.device)

    def _check_data(self) -> None:
        if self.spectrum.weighted:
            raise CalibrationError(f"the {self.spectrum} spectrum needs calibration records: give the fine-tuning "
                                   "data (--data, data_path)")
        if self.allocation.noise_estimate is NoiseEstimate.SPLIT_HALF:
            raise CalibrationError("noise_estimate 'split-half' needs the fine-tuning data (--data, data_path): two "
                                   "more fine-tunes, on halves of its fine-tuning subset")
        if self.finetuned is None:
            raise DataError("no data to fine-tune on: give the training records (--data, data_path), or the "
                            "fine-tuned model to skip fine-tuning")

    def check_calibration(self) -> int:
        """The calibration records of a curvature spectrum tokenize, with the tokenizer of the model the factors are
        collected from (the fine-tuned one; before the fine-tune, the base it copies), to enough tokens.
        Returns the number of calibration records (0 for the weight spectrum, which needs none).

        Raises:
            CalibrationError: naming the file and the counts.
        """
        if not self.spectrum.weighted:
            return 0
        self.check_inputs()
        from transformers import AutoTokenizer

        from ..checkpoints import resolve_model_path
        from ..loading import load_image_processor
        from .curvature import calibration_examples

        model = resolve_model_path(self.finetuned or self.base)
        # The command line's preflight and the flow's first task both ask, in one process: tokenized once.
        key = (self, *_file_identity(self.data_path), *_file_identity(Path(model) / "tokenizer.json"))
        if key not in _CALIBRATION_CHECKED:
            tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=self.trust_remote_code)
            _CALIBRATION_CHECKED[key] = len(calibration_examples(self.data_path, tokenizer, self.finetune,
                                                                 self.curvature, load_image_processor(model)))
        return _CALIBRATION_CHECKED[key]

    def check_before_finetune(self) -> None:
        """What a run that fine-tunes first can know from the base alone: the device, the rank bounds and the budget
        against the base's target modules (the fine-tuned model has the same shapes).

        Raises:
            DeviceError, CheckpointError, BudgetError: naming what is wrong.
        """
        from ..checkpoints import CheckpointPair

        resolve_device(self.analysis.device)
        pair = CheckpointPair(self.base, self.base, allow_pickle=self.allow_pickle)
        self._check_ranks({m.name: m.shape for m in pair.modules(self.analysis.targets)}, pair.base_parameters)

    def check_pair(self, *, read_weights: bool = False) -> OrderedDict[str, list[ModuleRef]]:
        """Check the pair before analyzing it; returns its target modules by layer.

        Checked: the device, every problem the headers show (``CheckpointPair.preflight``), the rank bounds
        (``ranks.check_rank_bounds``, unless ``allow_full_rank``) and the budget (``ranks.check_budget``) against the
        modules' shapes and, with ``read_weights``, NaN or Inf in any analyzed weight and a pair that is identical
        (``CheckpointPair.check_contents``: one read of the analyzed weights, I/O-bound).

        Raises:
            DeviceError, CheckpointError, BudgetError: naming what is wrong.
        """
        if self.finetuned is None:
            raise ValueError("check_pair needs the fine-tuned model (run the fine-tune first)")
        from ..checkpoints import CheckpointPair

        resolve_device(self.analysis.device)
        pair = CheckpointPair(self.base, self.finetuned, allow_pickle=self.allow_pickle)
        layers = pair.preflight(self.analysis.targets)
        modules = [m for group in layers.values() for m in group]
        self._check_ranks({m.name: m.shape for m in modules}, pair.base_parameters)
        if read_weights:
            pair.check_contents(modules)
        return layers

    def _check_ranks(self, shapes: dict[str, tuple[int, int]], base_parameters: int) -> None:
        from ..ranks import check_budget, check_rank_bounds

        if not self.allow_full_rank:
            check_rank_bounds(self.allocation, shapes)
        check_budget(self.allocation, shapes, base_parameters if self.allocation.budget_mode else None)

    # -- steps ------------------------------------------------------------------------------------------------------

    def collect_curvature(self, modules: Sequence[ModuleRef], svd_dir: str | Path,
                          on_batch: Callable[[int, int], None] | None = None) -> CurvatureResult | None:
        """The K-FAC factors of a curvature spectrum, one file per layer under ``svd_dir`` (None for the weight
        spectrum)."""
        if not self.spectrum.weighted:
            return None
        self.check_inputs()
        from .curvature import collect_layer_curvature

        return collect_layer_curvature(self.finetuned, self.data_path, modules, svd_dir, self.curvature, self.finetune,
                                       base=self.base, allow_pickle=self.allow_pickle, device=self.analysis.device,
                                       trust_remote_code=self.trust_remote_code, on_batch=on_batch)

    def analyze_layer(self, modules: Sequence[ModuleRef], svd_dir: str | Path, factors: CurvatureResult | None,
                      digests: tuple[str, str] | None = None) -> LayerResult:
        """One layer's spectra (curvature-weighted when ``factors`` has the layer's file)."""
        from ..checkpoints import CheckpointPair
        from .layer import analyze_layer

        pair = CheckpointPair(self.base, self.finetuned, allow_pickle=self.allow_pickle)
        layer = modules[0].layer
        return analyze_layer(pair, modules, svd_dir, top_k=self.allocation.required_top_k,
                             method=self.analysis.svd_method, device=self.analysis.device, digests=digests,
                             save_deltas=self.analysis.save_deltas, save_vectors=self.analysis.save_vectors,
                             curvature_path=factors.paths.get(layer) if factors else None,
                             damping=self.curvature.curvature_damping)

    def split_half_finetunes(self, out_dir: str | Path) -> tuple[str, str]:
        """The split-half noise estimate's two brief fine-tunes, on disjoint halves of the fine-tuning subset, under
        ``out_dir`` (``finetune.run_split_half_finetunes``): their fine-tuned folders."""
        from ..finetune import run_split_half_finetunes

        self.check_inputs()
        halves = run_split_half_finetunes(self.base, self.data_path, out_dir, self.finetune, progress=False,
                                          device=self.analysis.device, trust_remote_code=self.trust_remote_code)
        return halves[0].finetuned_dir, halves[1].finetuned_dir

    def split_half_ranks(self, halves: tuple[str, str], modules: Sequence[ModuleRef]) -> dict[str, SplitHalfModule]:
        """Per module, the directions the deltas of the two half fine-tunes share (``split_half.split_half_ranks``)."""
        from .split_half import split_half_ranks

        return split_half_ranks(self.base, halves[0], halves[1], modules, self.allocation.max_rank,
                                allow_pickle=self.allow_pickle)

    def split_half(self, out_dir: str | Path, modules: Sequence[ModuleRef]) -> dict[str, SplitHalfModule] | None:
        """With noise_estimate "split-half": both of the above in one call (the serial path); else None."""
        if self.allocation.noise_estimate is not NoiseEstimate.SPLIT_HALF:
            return None
        return self.split_half_ranks(self.split_half_finetunes(out_dir), modules)

    def metadata(self, factors: CurvatureResult | None, timings: Timings) -> dict:
        """What the config records about how it was analyzed, besides the allocation: the analysis settings, the
        curvature behind the spectra, the timings."""
        record = {"settings": self.curvature}
        if factors is not None:
            record.update({"calibration_data": self.data_path, "records": factors.records, "tokens": factors.tokens,
                           "response_tokens": factors.response_tokens,
                           "folder": str(Path(next(iter(factors.paths.values()))).parent),
                           "silent_modules": factors.silent_modules, "seconds": factors.seconds,
                           "passes": factors.passes, "accumulation_seconds": factors.accumulation_seconds,
                           "load_seconds": factors.load_seconds, "factor_memory_gb": factors.factor_memory_gb})
        return {"analysis": self.analysis, "curvature": record, "timings": timings}

    def assemble(self, modules: Sequence[ModuleRef], results: Sequence[LayerResult], config_path: str | Path,
                 factors: CurvatureResult | None, split_half: dict[str, SplitHalfModule] | None,
                 timings: Timings) -> RankConfig:
        """Allocate ranks from every layer's spectra and write the validated config atomically."""
        from ..checkpoints import CheckpointPair
        from .assemble import assemble_rank_config

        pair = CheckpointPair(self.base, self.finetuned, allow_pickle=self.allow_pickle)
        config, _ = assemble_rank_config(pair, modules, results, self.allocation, config_path, alpha_policy=self.alpha,
                                         extra_metadata=self.metadata(factors, timings), split_half=split_half)
        return config


class StepClock:
    """Wall-clock marks of an analysis, turned into the config's ``Timings`` (the same keys on every path)."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self.discovered: float | None = None  # headers read, curvature collected
        self.spectra_done: float | None = None  # every layer's spectra

    def mark_discovered(self) -> None:
        self.discovered = time.time()

    def mark_spectra_done(self) -> None:
        self.spectra_done = time.time()

    def timings(self, results: Sequence[LayerResult]) -> Timings:
        """Seconds since the start, of discovery, of the spectra (wall), and each layer's own compute time."""
        from ..config import Timings

        discovered = self.discovered or self.started
        spectra_done = self.spectra_done or time.time()
        return Timings(analysis_seconds=time.time() - self.started, discovery_seconds=discovered - self.started,
                       spectra_wall_seconds=spectra_done - discovered,
                       layer_task_seconds={r.layer: r.seconds for r in results})
