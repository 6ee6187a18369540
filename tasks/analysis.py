"""Tasks of the spectral analysis stage: discover layers, fingerprint and analyze each layer, assemble.

Caching: ``analyze-layer`` results are persisted and keyed by the layer's *content* (sha256 of its weights
in both checkpoints, from ``fingerprint-layer``) plus the analysis parameters that change the result, never
by run id or task source. A rerun after a crash, or with more layers, computes only what is missing;
``refresh=True`` on the flow recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from lora_ranks import __version__
from lora_ranks.analysis import LayerResult, analyze_layer, assemble_rank_config, layer_file_name
from lora_ranks.checkpoints import CheckpointPair, ModuleRef, TargetSpec
from lora_ranks.config import AlphaPolicy
from lora_ranks.ranks import AllocationSettings


@task(name="discover-layers", retries=2, retry_delay_seconds=5)
def discover_layers(base: str, finetuned: str, targets: TargetSpec, allow_pickle: bool = False) -> "OrderedDict[str, list[ModuleRef]]":
    """Validate the pair and list the target modules grouped by layer (names as PEFT will see them)."""
    layers = CheckpointPair(base, finetuned, allow_pickle=allow_pickle).layers(targets)
    n = sum(len(v) for v in layers.values())
    get_run_logger().info("Found %d target modules in %d layers", n, len(layers))
    return layers


@task(name="fingerprint-layer", retries=2, retry_delay_seconds=[2, 10], task_run_name="fingerprint-{layer}")
def fingerprint_layer(layer: str, modules: list[ModuleRef], base: str, finetuned: str,
                      allow_pickle: bool = False) -> tuple[str, str]:
    """sha256 of this layer's weights in the base and the fine-tuned checkpoint (the cache identity)."""
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    try:
        return pair.fingerprints(modules)
    finally:
        pair.close()


def layer_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ``analyze-layer``: content digests + everything that changes the stored result."""
    identity = [__version__, parameters["layer"], list(parameters["digests"]), parameters["top_k"],
                parameters["method"], parameters["save_deltas"], parameters.get("save_vectors", False),
                str(Path(parameters["svd_dir"]).resolve())]
    return "analyze-layer-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()


@task(name="analyze-layer", retries=2, retry_delay_seconds=[2, 10], task_run_name="analyze-{layer}",
      cache_key_fn=layer_cache_key, persist_result=True)
def analyze_layer_task(layer: str, modules: list[ModuleRef], digests: tuple[str, str], base: str, finetuned: str,
                       svd_dir: str, top_k: int, method: str = "auto", device: str | None = None,
                       allow_pickle: bool = False, save_deltas: bool = False, save_vectors: bool = False) -> LayerResult:
    """Spectra of one layer's deltas, written to ``<svd_dir>/raw_data/layers/<layer>.safetensors``."""
    logger = get_run_logger()
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    result = analyze_layer(pair, modules, svd_dir, top_k=top_k, method=method, device=device,
                           digests=tuple(digests), save_deltas=save_deltas, save_vectors=save_vectors)
    fallbacks = [name for name, dev in result.devices.items() if "out of memory" in dev]
    if fallbacks:
        logger.warning("%s: CUDA ran out of memory on %s; computed on the CPU instead", layer, ", ".join(fallbacks))
    logger.info("%s: %d modules in %.2f s (%s)", layer, len(modules), result.seconds,
                ", ".join(sorted(set(result.methods.values()))))
    return result


def layer_result_is_current(result: LayerResult) -> bool:
    """True if the layer file a (possibly cached) result points to still exists with the same fingerprint."""
    path = Path(result.path)
    if not path.is_file() or path.name != layer_file_name(result.layer):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata().get("fingerprint") == result.fingerprint
    except Exception:
        return False


@task(name="assemble-rank-config")
def assemble_rank_config_task(base: str, finetuned: str, layers: "OrderedDict[str, list[ModuleRef]]",
                              results: list[LayerResult], settings: AllocationSettings, config_path: str,
                              alpha_policy: AlphaPolicy, started: float, allow_pickle: bool = False) -> str:
    """Allocate ranks from every layer's spectra and write the validated config atomically."""
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    modules = [m for mods in layers.values() for m in mods]
    extra = {"timings": {"analysis_seconds": time.time() - started,
                         "layer_task_seconds": {r.layer: r.seconds for r in results}}}
    config, _ = assemble_rank_config(pair, modules, results, settings, config_path, alpha_policy=alpha_policy,
                                     extra_metadata=extra)
    meta = config["analysis_metadata"]
    logger = get_run_logger()
    if meta["zero_delta_modules"]:
        logger.warning("%d module(s) did not change during fine-tuning (zero delta), e.g. %s; they get min_rank=%d",
                       len(meta["zero_delta_modules"]), meta["zero_delta_modules"][0], settings.min_rank)
    if meta["n_saturated"]:
        logger.warning("%d module(s) need more than max_rank=%d to keep %.0f%% of their delta energy (saturated)",
                       meta["n_saturated"], settings.max_rank, 100 * settings.energy_threshold)
    logger.info("Wrote %s: %d modules, layer ranks %s, compression ratio %.4f, %d saturated",
                          config_path, meta["n_modules"], config["layer_ranks"], config["compression_ratio"],
                          meta["n_saturated"])
    return config_path
