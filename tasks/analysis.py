"""Tasks of the spectral analysis stage: discover layers, fingerprint and analyze each layer, assemble.

Caching: ``analyze-layer`` results are persisted and keyed by the layer's *content* (sha256 of its weights in
both checkpoints, from ``fingerprint-layer``), the identity of the numerics that compute it (a digest of that
library code and the package version), the device type and the method each matrix resolves to there, and the
parameters that change the stored file; never by run id or task source. A rerun after a crash, or with more
layers, computes only what is missing; an upgrade, a code change or a move from CPU to GPU recomputes;
``refresh=True`` on the flow recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from lora_ranks.analysis import (
    AnalysisPlan,
    CurvatureResult,
    LayerResult,
    SplitHalfModule,
    layer_file_fingerprint,
    layer_file_name,
    numerics_identity,
    zero_delta_message,
)
from lora_ranks.checkpoints import CheckpointPair, ModuleRef
from lora_ranks.config import Timings
from lora_ranks.spectra import default_device, resolve_method
from tasks._cache import file_digest
from tasks._common import TRANSIENT_RETRIES, retry_if_transient


@task(name="discover-layers", **TRANSIENT_RETRIES, retry_condition_fn=retry_if_transient)
def discover_layers(plan: AnalysisPlan) -> OrderedDict[str, list[ModuleRef]]:
    """Preflight the pair (the device, every problem its headers show in one error, the budget) and list the target
    modules by layer."""
    layers = plan.check_pair(read_weights=False)
    get_run_logger().info("Found %d target modules in %d layers", sum(len(v) for v in layers.values()), len(layers))
    return layers


@task(name="check-before-finetune")
def check_before_finetune_task(plan: AnalysisPlan) -> None:
    """The device and the budget, checked against the base before the fine-tune runs."""
    plan.check_before_finetune()


@task(name="fingerprint-layer", **TRANSIENT_RETRIES, retry_condition_fn=retry_if_transient,
      task_run_name="fingerprint-{layer}")
def fingerprint_layer(plan: AnalysisPlan, layer: str, modules: list[ModuleRef]) -> tuple[str, str]:
    """sha256 of this layer's weights in the plan's base and fine-tuned checkpoints (the cache identity)."""
    pair = CheckpointPair(plan.base, plan.finetuned, allow_pickle=plan.allow_pickle)
    try:
        return pair.fingerprints(modules)
    finally:
        pair.close()


@task(name="split-half-ranks", task_run_name="split-half-ranks")
def split_half_ranks_task(plan: AnalysisPlan, halves: tuple[str, str], modules: list[ModuleRef]
                          ) -> dict[str, SplitHalfModule]:
    """Per module, the directions the two half fine-tunes share (``AnalysisPlan.split_half_ranks``)."""
    ranks = plan.split_half_ranks(halves, modules)
    get_run_logger().info("Split-half ranks: %s", {n: r.rank for n, r in ranks.items()})
    return ranks


@task(name="check-inputs")
def check_inputs_task(plan: AnalysisPlan) -> int:
    """Before any fine-tuning: the device, the data the steps need and, for a curvature spectrum, calibration records
    with enough tokens. Returns the number of calibration records (0 for the weight spectrum)."""
    plan.check_inputs()
    return plan.check_calibration()


def _device_type(device: str | None) -> str:
    return (device or default_device().type).split(":")[0]


def curvature_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ``collect-curvature``: the fine-tuned weights (their layer digests) and the base's (projected
    factors go through the delta), the calibration file's bytes, the settings that shape the factors, the numerics
    identity and the device type."""
    plan: AnalysisPlan = parameters["plan"]
    data = file_digest(plan.data_path)
    digests = parameters["digests"]
    identity = [numerics_identity(), _device_type(plan.analysis.device), sorted(d[1] for d in digests),
                sorted(d[0] for d in digests), data, plan.curvature.to_dict(), plan.finetune.to_dict(),
                [m.name for m in parameters["modules"]], str(Path(parameters["svd_dir"]).resolve())]
    return "collect-curvature-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()


@task(name="collect-curvature", **TRANSIENT_RETRIES, retry_condition_fn=retry_if_transient,
      cache_key_fn=curvature_cache_key, persist_result=True, task_run_name="collect-curvature")
def collect_curvature_task(plan: AnalysisPlan, modules: list[ModuleRef], svd_dir: str,
                           digests: list[tuple[str, str]]) -> CurvatureResult:
    """K-FAC factors of every target module from the fine-tuned model on the calibration records, one file per
    layer (``AnalysisPlan.collect_curvature``; ``digests``: each layer's (base, fine-tuned) weight digests, the cache
    identity); progress lines every few seconds (``lora_ranks.progress``)."""
    logger = get_run_logger()
    result = plan.collect_curvature(modules, svd_dir)
    curvature = plan.curvature
    logger.info("%s factors of %d layers from %d records (%d tokens, %d trained on): %d pass(es) holding up to %.1f GiB "
                "of factors each, %.1f s, of which %.1f s forming the factors", curvature.spectrum, len(result.paths),
                result.records, result.tokens, result.response_tokens, result.passes, result.factor_memory_gb,
                result.seconds, result.accumulation_seconds)
    if result.silent_modules:
        logger.warning("%d module(s) never ran on the calibration records (e.g. %s): their ranks use the weight "
                       "spectrum", len(result.silent_modules), result.silent_modules[0])
    return result


def curvature_result_is_current(result: CurvatureResult) -> bool:
    """True if every layer file a (possibly cached) curvature result points to still has the recorded bytes."""
    for layer, path in result.paths.items():
        if not Path(path).is_file() or file_digest(path) != result.digests[layer]:
            return False
    return True


def layer_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ``analyze-layer`` (see the module docstring). Computed where the task runs, so the device type
    is the one the task would use."""
    plan: AnalysisPlan = parameters["plan"]
    analysis, top_k, factors = plan.analysis, plan.allocation.required_top_k, parameters.get("factors")
    device_type = _device_type(analysis.device)
    methods = [resolve_method(analysis.svd_method, device_type, m.shape, top_k) for m in parameters["modules"]]
    identity = [numerics_identity(), device_type, methods, parameters["layer"], list(parameters["digests"]),
                top_k, analysis.svd_method, analysis.save_deltas, analysis.save_vectors,
                str(Path(parameters["svd_dir"]).resolve()),
                factors.digests[parameters["layer"]] if factors else None,
                plan.curvature.curvature_damping if factors else 0.0]
    return "analyze-layer-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()


@task(name="analyze-layer", **TRANSIENT_RETRIES, retry_condition_fn=retry_if_transient,
      task_run_name="analyze-{layer}", cache_key_fn=layer_cache_key, persist_result=True)
def analyze_layer_task(plan: AnalysisPlan, layer: str, modules: list[ModuleRef], digests: tuple[str, str],
                       svd_dir: str, factors: CurvatureResult | None = None) -> LayerResult:
    """Spectra of one layer's deltas (``AnalysisPlan.analyze_layer``; curvature-weighted with ``factors``), written
    to ``<svd_dir>/raw_data/layers/<layer>.safetensors``."""
    logger = get_run_logger()
    result = plan.analyze_layer(modules, svd_dir, factors, tuple(digests))
    if result.cuda_oom_fallbacks:
        logger.warning("%s: CUDA ran out of memory on %s; computed on the CPU instead", layer,
                       ", ".join(result.cuda_oom_fallbacks))
    logger.info("%s: %d modules in %.2f s (%s)", layer, len(modules), result.seconds,
                ", ".join(sorted(set(result.methods.values()))))
    return result


def layer_result_is_current(result: LayerResult) -> bool:
    """True if the layer file a (possibly cached) result points to still exists with the same fingerprint."""
    path = Path(result.path)
    return path.name == layer_file_name(result.layer) and layer_file_fingerprint(path) == result.fingerprint


@task(name="assemble-rank-config")
def assemble_rank_config_task(plan: AnalysisPlan, layers: OrderedDict[str, list[ModuleRef]], results: list[LayerResult],
                              config_path: str, timings: Timings, curvature_result: CurvatureResult | None = None,
                              split_half: dict[str, SplitHalfModule] | None = None) -> str:
    """Allocate ranks from every layer's spectra and write the validated config atomically."""
    modules = [m for mods in layers.values() for m in mods]
    config = plan.assemble(modules, results, config_path, curvature_result, split_half, timings)
    meta, settings = config.analysis_metadata, plan.allocation
    logger = get_run_logger()
    if meta.zero_delta_modules:
        logger.warning(zero_delta_message(meta.zero_delta_modules, settings.min_rank))
    if meta.n_saturated:
        logger.warning("%d module(s) need more than max_rank=%d to keep %.0f%% of their delta energy (saturated)",
                       meta.n_saturated, settings.max_rank, 100 * settings.energy_threshold)
    logger.info("Wrote %s: %d modules, layer ranks %s, compression ratio %.4f, %d saturated", config_path,
                meta.n_modules, config.layer_ranks, config.compression_ratio, meta.n_saturated)
    return config_path
