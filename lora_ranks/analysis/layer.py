"""The unit of parallel work: the spectra of one transformer layer's deltas.

``analyze_layer`` computes every target module of one layer (its 7 projections by default), writes the
layer's singular values to ``<svd_dir>/raw_data/layers/<layer>.safetensors`` (see ``layout``) and returns a
small ``LayerResult``, so orchestrators move paths, not tensors. ``numerics_identity`` names the code that
produced a result, for cache keys that cannot go stale.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoints import CheckpointPair, ModuleRef
from ..spectra import (
    Spectrum,
    SpectrumMethod,
    blas_threads,
    compute_spectrum,
    default_device,
    parallel_plan,
    spectra_pool,
    truncated_svd_factors,
)
from ..spectra.kind import SpectrumKind
from ..spectra.projected import ProjectedCurvature, module_weighted_spectrum, shares_gram
from ..spectra.spectrum import gram_spectrum, short_side_gram
from .curvature import curvature_roots
from .layout import (
    DELTA_FILES,
    VECTOR_FILES,
    WEIGHT_PREFIX,
    LayerFileMetadata,
    SpectrumFacts,
    layer_file,
    write_layer_file,
)

__all__ = ["LayerResult", "analyze_layer", "numerics_identity", "WEIGHT_PREFIX"]

# The modules whose code decides what a layer file contains: deltas, spectra, factors and the file format.
_NUMERICS_MODULES = ("lora_ranks.checkpoints.pair", "lora_ranks.spectra.spectrum", "lora_ranks.spectra.factors",
                     "lora_ranks.spectra.weighted", "lora_ranks.spectra.projected", "lora_ranks.kfac",
                     "lora_ranks.analysis.curvature", "lora_ranks.analysis.layer", "lora_ranks.analysis.layout")



@functools.cache
def numerics_identity() -> str:
    """sha256 of the package version and the source of every module that computes a layer's spectra.

    Any edit to that code (even a comment) changes it, so persisted results computed by other numerics are
    never served from a cache; unrelated code (plots, flows, the CLI) does not enter it.
    """
    digest = hashlib.sha256(__version__.encode())
    for name in _NUMERICS_MODULES:
        digest.update(name.encode())
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


@dataclass
class LayerResult:
    """What one layer task returns: where its spectra are and how long they took (small, picklable)."""

    layer: str
    path: str
    modules: list[str]
    fingerprint: str  # sha256 of (base digest, fine-tuned digest): the layer's content identity
    base_digest: str
    finetuned_digest: str
    seconds: float
    methods: dict[str, str] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    # Modules (names as in ``modules``) with a spectrum (weight or weighted) that CUDA ran out of memory on and the
    # CPU computed instead (``Spectrum.cuda_oom_fallback``).
    cuda_oom_fallbacks: tuple[str, ...] = ()


def analyze_layer(
    pair: CheckpointPair,
    modules: Sequence[ModuleRef],
    svd_dir: str | Path,
    *,
    top_k: int,
    method: SpectrumMethod = "auto",
    device: str | None = None,
    digests: tuple[str, str] | None = None,
    save_deltas: bool = False,
    save_vectors: bool = False,
    curvature_path: str | Path | None = None,
    damping: float = 0.0,
) -> LayerResult:
    """Compute and store the spectra of one layer's modules.

    Args:
        pair: the checkpoint pair.
        modules: this layer's modules (all with the same ``layer``).
        svd_dir: the SVD output folder (``OutputLayout.svd_dir``); the file goes to ``raw_data/layers/``.
        top_k: singular values kept per module (max_rank + 1).
        method, device: passed to ``compute_spectrum``.
        digests: (base, fine-tuned) content digests of the layer if already computed (else computed here).
        save_deltas: also write the float32 deltas to ``<svd_dir>/delta_weights/<layer>.safetensors``
            (4 bytes per parameter: ~26 GB for a 7B model's projections; off by default).
        save_vectors: also write the top-``top_k`` singular directions of each delta, as the factor pair
            ``<name>.B`` = U_k diag(sqrt s_k) (d_out, k) and ``<name>.A`` = diag(sqrt s_k) V_k^T (k, d_in), float32,
            to ``<svd_dir>/singular_vectors/<layer>.safetensors``; B[:, :r] @ A[:r] is the truncated SVD at any
            rank r <= k (what extraction needs).
        curvature_path: this layer's curvature file (``analysis.curvature``): the main spectra are then the
            curvature-weighted ones (``spectra.weighted``, with relative ``damping``), and the plain weight spectra
            are stored beside them under ``weight:<module>`` (the noise floor is read from those). A module the
            calibration never ran through keeps its weight spectrum, and its record says so.
    """
    if not modules:
        raise ValueError("analyze_layer needs at least one module")
    layers = {m.layer for m in modules}
    if len(layers) != 1:
        raise ValueError(f"analyze_layer takes one layer's modules, got modules of {sorted(layers)}")
    start = time.perf_counter()
    try:
        return _analyze_layer(pair, modules, Path(svd_dir), top_k, method, device, digests, save_deltas, save_vectors,
                              curvature_path, damping, start)
    finally:
        pair.close()  # unmap this layer's pages: memory stays flat however many layers follow


def _analyze_layer(pair, modules, svd_dir, top_k, method, device, digests, save_deltas, save_vectors,
                   curvature_path, damping, start) -> LayerResult:
    layer = modules[0].layer
    roots, kind = curvature_roots(modules, curvature_path, damping, device=device)
    # On the CPU the spectra run in float64 (NumPy's Gram path uses the delta in place); a GPU gets float32,
    # half the bytes to move, and converts on the device.
    workers, threads = parallel_plan(len(modules), device)
    on_cpu = (torch.device(device) if device is not None else default_device()).type == "cpu"
    delta_dtype = torch.float64 if on_cpu else torch.float32
    digest_jobs = []
    if digests is None and workers > 1:  # hash both checkpoints' bytes (sha256 releases the GIL) beside the spectra
        keys = [m.weight_key for m in modules]
        digest_jobs = [spectra_pool(workers).submit(c.content_digest, keys) for c in (pair.base, pair.finetuned)]
    elif digests is None:
        digests = pair.fingerprints(modules)

    def one_module(module: ModuleRef) -> tuple[ModuleRef, Spectrum, Spectrum | None, torch.Tensor | None, tuple | None]:
        delta = pair.delta(module, dtype=delta_dtype)  # (d_out, d_in)
        curvature = roots.get(module.name)
        gram = None
        if isinstance(curvature, ProjectedCurvature) and shares_gram(curvature, delta, top_k, method, device):
            # The weight spectrum's Gram is the one the projected curvature needs: computed once for both.
            started = time.perf_counter()
            gram = short_side_gram(delta)
            spectrum = gram_spectrum(gram, delta, top_k)
            spectrum = Spectrum(**{**spectrum.__dict__, "seconds": time.perf_counter() - started})  # the Gram's too
        else:
            spectrum = compute_spectrum(delta, top_k, method=method, device=device)
        weighted = None
        if curvature is not None:
            weighted = module_weighted_spectrum(delta, top_k, curvature, method=method, device=device, gram=gram)
        del gram
        factors = truncated_svd_factors(delta, min(top_k, *delta.shape), 1.0)[:2] if save_vectors else None  # (A, B)
        return module, spectrum, weighted, (delta.float() if save_deltas else None), factors

    if workers == 1:
        results = [one_module(m) for m in modules]
    else:  # a layer's matrices side by side, each with a share of the BLAS threads (see parallel_plan)
        # Largest first (LPT scheduling), so that no big matrix is left running alone at the end while the other
        # workers idle; results go back to module order below.
        by_cost = sorted(modules, key=lambda m: -_spectrum_cost(m.shape))
        with blas_threads(threads):
            done = {r[0].name: r for r in spectra_pool(workers).map(one_module, by_cost)}
        results = [done[m.name] for m in modules]
    base_digest, finetuned_digest = [job.result() for job in digest_jobs] if digest_jobs else digests
    fingerprint = hashlib.sha256(f"{base_digest}|{finetuned_digest}".encode()).hexdigest()

    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    vectors: dict[str, torch.Tensor] = {}
    facts: dict[str, SpectrumFacts] = {}
    for module, spectrum, weighted, delta, factors in results:  # in module order whatever finished first
        if delta is not None:
            deltas[module.name] = delta
        if factors is not None:
            vectors[f"{module.name}.A"], vectors[f"{module.name}.B"] = factors
        main = weighted if weighted is not None else spectrum
        tensors[module.name] = torch.from_numpy(main.singular_values.copy())  # (k,) float64
        fallback = ("never ran on the calibration records: weight spectrum"
                    if kind is not SpectrumKind.WEIGHT and weighted is None else None)
        facts[module.name] = SpectrumFacts.of(main, kind if weighted is not None else SpectrumKind.WEIGHT, fallback)
        if kind is not SpectrumKind.WEIGHT:
            tensors[WEIGHT_PREFIX + module.name] = torch.from_numpy(spectrum.singular_values.copy())
            facts[WEIGHT_PREFIX + module.name] = SpectrumFacts.of(spectrum, SpectrumKind.WEIGHT)
    path = layer_file(svd_dir, layer)
    write_layer_file(path, tensors, LayerFileMetadata(layer, fingerprint, base_digest, finetuned_digest, kind,
                                                      facts).to_strings())
    for folder, payload in ((DELTA_FILES, deltas), (VECTOR_FILES, vectors)):
        if payload:
            write_layer_file(layer_file(svd_dir, layer, folder), payload, {"layer": layer, "fingerprint": fingerprint})
    return LayerResult(layer, str(path), [m.name for m in modules], fingerprint, base_digest, finetuned_digest,
                       time.perf_counter() - start,
                       {n: f.method for n, f in facts.items()}, {n: f.device for n, f in facts.items()},
                       tuple(m.name for m, spectrum, weighted, *_ in results
                             if spectrum.cuda_oom_fallback or (weighted is not None and weighted.cuda_oom_fallback)))


def _spectrum_cost(shape: tuple[int, int]) -> int:
    """Flop count of the Gram method for a (m, n) delta, up to a constant: m n^2 + n^3 for n = min(m, n)."""
    short, long = sorted(shape)
    return long * short**2 + short**3
