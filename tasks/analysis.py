"""Tasks of the spectral analysis stage: discover layers, one task per layer, assemble the config."""

from __future__ import annotations

import time
from collections import OrderedDict

from prefect import get_run_logger, task

from lora_ranks.analysis import LayerResult, analyze_layer, assemble_rank_config
from lora_ranks.checkpoints import CheckpointPair, ModuleRef, TargetSpec
from lora_ranks.config import AlphaPolicy
from lora_ranks.ranks import AllocationSettings


@task(name="discover-layers")
def discover_layers(base: str, finetuned: str, targets: TargetSpec, allow_pickle: bool = False) -> "OrderedDict[str, list[ModuleRef]]":
    """Validate the pair and list the target modules grouped by layer (names as PEFT will see them)."""
    layers = CheckpointPair(base, finetuned, allow_pickle=allow_pickle).layers(targets)
    n = sum(len(v) for v in layers.values())
    get_run_logger().info("Found %d target modules in %d layers", n, len(layers))
    return layers


@task(name="analyze-layer", retries=2, retry_delay_seconds=[2, 10], task_run_name="analyze-{layer}")
def analyze_layer_task(layer: str, modules: list[ModuleRef], base: str, finetuned: str, svd_dir: str, top_k: int,
                       method: str = "auto", device: str | None = None, allow_pickle: bool = False,
                       save_deltas: bool = False) -> LayerResult:
    """Spectra of one layer's deltas, written to ``<svd_dir>/raw_data/layers/<layer>.safetensors``."""
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    result = analyze_layer(pair, modules, svd_dir, top_k=top_k, method=method, device=device, save_deltas=save_deltas)
    get_run_logger().info("%s: %d modules in %.2f s (%s)", layer, len(modules), result.seconds,
                          ", ".join(sorted(set(result.methods.values()))))
    return result


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
    get_run_logger().info("Wrote %s: %d modules, layer ranks %s, compression ratio %.4f, %d saturated",
                          config_path, meta["n_modules"], config["layer_ranks"], config["compression_ratio"],
                          meta["n_saturated"])
    return config_path
