"""The analysis pipeline as plain functions: per-layer spectra on disk, then one rank config.

``analyze_layer`` is the unit of parallel work (one transformer block: its 7 projections by default). It
writes the layer's singular values to ``<out>/raw_data/layers/<layer>.safetensors`` (float64 vectors keyed
by module name; energies, methods and accuracy in the file's metadata) and returns a small summary, so
orchestrators move paths, not tensors. ``assemble_rank_config`` reads those files back, allocates ranks and
writes the config. ``analyze_checkpoints`` runs both serially for users who do not need Prefect.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ._io import atomic_write
from .checkpoints import CheckpointPair, ModuleRef, TargetSpec
from .config import AlphaPolicy, build_rank_config, save_rank_config
from .ranks import AllocationSettings, allocate_ranks
from .spectra import Spectrum, SpectrumMethod, blas_threads, compute_spectrum, default_device, parallel_plan

__all__ = ["OutputLayout", "LayerResult", "analyze_layer", "load_layer_spectra", "load_spectra", "spectra_files", "assemble_rank_config", "analyze_checkpoints",
           "layer_file_name"]


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's files go, under one root (the original design's folder names)::

        <root>/saved_models/preliminary_finetune/{pretrained,finetuned,training_metrics.json}
        <root>/configs/lora_rank_config.json
        <root>/analysis_outputs/svd/{plots,raw_data}/
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def finetune_dir(self) -> Path:
        return self.root / "saved_models" / "preliminary_finetune"

    @property
    def config_path(self) -> Path:
        return self.root / "configs" / "lora_rank_config.json"

    @property
    def svd_dir(self) -> Path:
        return self.root / "analysis_outputs" / "svd"


@dataclass
class LayerResult:
    """What one layer task returns: where its spectra are and how long they took (small, picklable)."""

    layer: str
    path: str
    modules: list[str]
    fingerprint: str  # sha256 of (base digest, fine-tuned digest): the layer's cache identity
    base_digest: str
    finetuned_digest: str
    seconds: float
    methods: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)


def layer_file_name(layer: str) -> str:
    """File name for a layer's spectra: ``model.layers.3`` -> ``model.layers.3.safetensors``."""
    return layer.replace("/", "_") + ".safetensors"


def analyze_layer(
    pair: CheckpointPair,
    modules: Sequence[ModuleRef],
    out_dir: str | Path,
    *,
    top_k: int,
    method: SpectrumMethod = "auto",
    device: str | None = None,
    digests: tuple[str, str] | None = None,
    save_deltas: bool = False,
    save_vectors: bool = False,
) -> LayerResult:
    """Compute and store the spectra of one layer's modules.

    Args:
        pair: the checkpoint pair.
        modules: this layer's modules (all with the same ``layer``).
        out_dir: the SVD output folder (``OutputLayout.svd_dir``); the file goes to ``raw_data/layers/``.
        top_k: singular values kept per module (max_rank + 1).
        method, device: passed to ``compute_spectrum``.
        digests: (base, fine-tuned) content digests of the layer if already computed (else computed here).
        save_deltas: also write the float32 deltas to ``<out_dir>/delta_weights/<layer>.safetensors``
            (4 bytes per parameter: ~26 GB for a 7B model's projections; off by default).
        save_vectors: also write the top-``top_k`` singular directions of each delta, as the factor pair
            ``<name>.B`` = U_k diag(sqrt s_k) (d_out, k) and ``<name>.A`` = diag(sqrt s_k) V_k^T (k, d_in),
            float32, to ``<out_dir>/singular_vectors/<layer>.safetensors``; B[:, :r] @ A[:r] is the
            truncated SVD at any rank r <= k (what extraction needs).
    """
    if not modules:
        raise ValueError("analyze_layer needs at least one module")
    layers = {m.layer for m in modules}
    if len(layers) != 1:
        raise ValueError(f"analyze_layer takes one layer's modules, got modules of {sorted(layers)}")
    start = time.perf_counter()
    try:
        return _analyze_layer(pair, modules, Path(out_dir), top_k, method, device, digests, save_deltas, save_vectors,
                              start)
    finally:
        pair.close()  # unmap this layer's pages: memory stays flat however many layers follow


def _analyze_layer(pair, modules, out_dir, top_k, method, device, digests, save_deltas, save_vectors,
                   start) -> LayerResult:
    layer = modules[0].layer
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    vectors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}

    # On the CPU the spectra run in float64 (NumPy's Gram path uses the delta in place); a GPU gets float32,
    # half the bytes to move, and converts on the device.
    workers, threads = parallel_plan(len(modules), device)
    on_cpu = (torch.device(device) if device is not None else default_device()).type == "cpu"
    delta_dtype = torch.float64 if on_cpu else torch.float32
    digest_jobs = []
    if digests is None and workers > 1:  # hash both checkpoints' bytes (sha256 releases the GIL) beside the spectra
        keys = [m.weight_key for m in modules]
        digest_jobs = [_spectra_pool(workers).submit(c.content_digest, keys) for c in (pair.base, pair.finetuned)]
    elif digests is None:
        digests = pair.fingerprints(modules)

    def one_module(module: ModuleRef) -> tuple[ModuleRef, Spectrum, torch.Tensor | None, tuple | None]:
        delta = pair.delta(module, dtype=delta_dtype)  # (d_out, d_in)
        spectrum = compute_spectrum(delta, top_k, method=method, device=device)
        factors = None
        if save_vectors:
            from .extract import truncated_svd_factors

            factors = truncated_svd_factors(delta, min(top_k, *delta.shape), 1.0)[:2]  # (A, B)
        return module, spectrum, (delta.float() if save_deltas else None), factors

    if workers == 1:
        results = [one_module(m) for m in modules]
    else:  # a layer's matrices side by side, each with a share of the BLAS threads (see parallel_plan)
        # Largest first (LPT scheduling), so that no big matrix is left running alone at the end while the
        # other workers idle; results go back to module order below.
        by_cost = sorted(modules, key=lambda m: -_spectrum_cost(m.shape))
        with blas_threads(threads):
            done = {r[0].name: r for r in _spectra_pool(workers).map(one_module, by_cost)}
        results = [done[m.name] for m in modules]
    base_digest, finetuned_digest = [job.result() for job in digest_jobs] if digest_jobs else digests
    fingerprint = hashlib.sha256(f"{base_digest}|{finetuned_digest}".encode()).hexdigest()
    for module, spectrum, delta, factors in results:  # in module order whatever finished first
        if delta is not None:
            deltas[module.name] = delta
        if factors is not None:
            vectors[f"{module.name}.A"], vectors[f"{module.name}.B"] = factors
        tensors[module.name] = torch.from_numpy(spectrum.singular_values.copy())  # (k,) float64
        info[module.name] = {"total_energy": spectrum.total_energy, "shape": list(spectrum.shape),
                             "method": spectrum.method, "rel_error_bound": spectrum.rel_error_bound,
                             "seconds": spectrum.seconds, "device": spectrum.device,
                             "power_iters": spectrum.power_iters}
    path = Path(out_dir) / "raw_data" / "layers" / layer_file_name(layer)
    metadata = {"layer": layer, "fingerprint": fingerprint, "base_digest": base_digest,
                "finetuned_digest": finetuned_digest, "modules": json.dumps(info)}

    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    for folder, payload in (("delta_weights", deltas), ("singular_vectors", vectors)):
        if payload:
            atomic_write(Path(out_dir) / folder / layer_file_name(layer),
                         lambda tmp, payload=payload: save_file(payload, tmp, metadata={"layer": layer, "fingerprint": fingerprint}))
    return LayerResult(layer, str(path), [m.name for m in modules], fingerprint, base_digest, finetuned_digest,
                       time.perf_counter() - start,
                       {n: i["method"] for n, i in info.items()}, {n: i["device"] for n, i in info.items()})


def _spectrum_cost(shape: tuple[int, int]) -> int:
    """Flop count of the Gram method for a (m, n) delta, up to a constant: m n^2 + n^3 for n = min(m, n)."""
    short, long = sorted(shape)
    return long * short**2 + short**3


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:  # a forked child has none of the parent's threads (or lock holders)
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _spectra_pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per size: reused threads keep reusing their malloc arenas, so peak memory stays
    flat over layers (a fresh pool per layer grew it by ~60 MB between 8 and 32 layers)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="spectra")
        return _POOLS[workers]


def _combine(digests) -> str:
    return hashlib.sha256("|".join(digests).encode()).hexdigest()


def load_layer_spectra(path: str | Path) -> dict[str, Spectrum]:
    """Read a layer file written by ``analyze_layer`` back into ``module name -> Spectrum``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        info = json.loads(handle.metadata()["modules"])
        out = {}
        for name, meta in info.items():
            values = handle.get_tensor(name).numpy()
            out[name] = Spectrum(values, meta["total_energy"], tuple(meta["shape"]), meta["method"],
                                 meta["rel_error_bound"], meta["seconds"], meta["device"], meta["power_iters"])
    return out


def load_spectra(paths: Iterable[str | Path]) -> dict[str, Spectrum]:
    """All modules' spectra from layer files (``LayerResult.path``s, or ``spectra_files(svd_dir)``)."""
    spectra: dict[str, Spectrum] = {}
    for path in paths:
        spectra.update(load_layer_spectra(path))
    return spectra


def spectra_files(svd_dir: str | Path) -> list[Path]:
    """The layer files under an SVD output folder (``OutputLayout.svd_dir``), in name order."""
    return sorted((Path(svd_dir) / "raw_data" / "layers").glob("*.safetensors"))


def assemble_rank_config(
    pair: CheckpointPair,
    modules: Sequence[ModuleRef],
    layer_results: Sequence[LayerResult],
    settings: AllocationSettings,
    config_path: str | Path,
    *,
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    extra_metadata: dict | None = None,
) -> tuple[dict, dict[str, Spectrum]]:
    """Read every layer's spectra, allocate ranks, write the validated config atomically.

    Returns:
        (config dict, spectra by module name) -- the spectra feed the plots and raw-data export.
    """
    spectra = load_spectra(r.path for r in layer_results)
    allocations = allocate_ranks(modules, spectra, settings, base_parameters=pair.base_parameters)
    spectra_info = {
        name: {"svd_method": s.method, "rel_error_bound": s.rel_error_bound, "svd_seconds": round(s.seconds, 6),
               "device": s.device, "total_energy": s.total_energy}
        for name, s in spectra.items()
    }
    metadata = {
        "checkpoints": pair.identity(content=(_combine(r.base_digest for r in layer_results),
                                              _combine(r.finetuned_digest for r in layer_results))),
        "layer_fingerprints": {r.layer: r.fingerprint for r in layer_results},
        "svd": {
            "methods": sorted({s.method for s in spectra.values()}),
            "max_rel_error_bound": max(s.rel_error_bound for s in spectra.values()),
            # per-matrix compute seconds, summed (matrices of a layer run side by side: can exceed wall time)
            "total_seconds": sum(s.seconds for s in spectra.values()),
            "top_k": settings.required_top_k,
        },
    }
    if extra_metadata:
        metadata.update(extra_metadata)
    config = build_rank_config(allocations, settings, base_parameters=pair.base_parameters,
                               alpha_policy=alpha_policy, spectra_info=spectra_info, extra_metadata=metadata)
    save_rank_config(config_path, config)
    return config, spectra


def analyze_checkpoints(
    base: str | Path,
    finetuned: str | Path,
    out_dir: str | Path,
    *,
    settings: AllocationSettings = AllocationSettings(),
    targets: TargetSpec = TargetSpec(),
    method: SpectrumMethod = "auto",
    device: str | None = None,
    alpha_policy: AlphaPolicy = AlphaPolicy(),
    allow_pickle: bool = False,
    save_deltas: bool = False,
    save_vectors: bool = False,
) -> dict:
    """Whole analysis in one process, layer after layer (what the ``svd-analysis`` flow fans out).

    Writes the config and per-layer spectra into ``OutputLayout(out_dir)``; returns the config dict.
    """
    start = time.perf_counter()
    layout = OutputLayout(out_dir)
    pair = CheckpointPair(base, finetuned, allow_pickle=allow_pickle)
    layers = pair.layers(targets)  # reads headers and builds the model on the meta device (names, counts)
    discovered = time.perf_counter()
    results = [analyze_layer(pair, mods, layout.svd_dir, top_k=settings.required_top_k, method=method, device=device,
                             save_deltas=save_deltas, save_vectors=save_vectors)
               for mods in layers.values()]
    spectra_done = time.perf_counter()
    modules = [m for mods in layers.values() for m in mods]
    timings = {"discovery_seconds": discovered - start, "spectra_wall_seconds": spectra_done - discovered,
               "analysis_seconds": spectra_done - start}
    config, _ = assemble_rank_config(pair, modules, results, settings, layout.config_path,
                                     alpha_policy=alpha_policy, extra_metadata={"timings": timings})
    return config
