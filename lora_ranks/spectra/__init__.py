"""Stage 2: the spectrum of a weight delta, and its truncated SVD as LoRA factors.

    spectrum.py   exact energy + accurate top-k singular values (``compute_spectrum``, ``Spectrum``)
    factors.py    the best rank-r LoRA factors of a delta (``truncated_svd_factors``)
    threads.py    CPU parallelism: matrices side by side with a share of the BLAS threads each
    kind.py       which spectrum ranks the directions (``SpectrumKind``: weight, input, fisher)
"""

from importlib import import_module

_EXPORTS = {
    "truncated_svd_factors": "factors", "SpectrumKind": "kind",
    "Spectrum": "spectrum", "SpectrumMethod": "spectrum", "compute_spectrum": "spectrum", "default_device": "spectrum",
    "resolve_method": "spectrum", "blas_threads": "threads", "parallel_plan": "threads", "spectra_pool": "threads",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use: ``SpectrumKind`` (and settings-only code) without torch.
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
