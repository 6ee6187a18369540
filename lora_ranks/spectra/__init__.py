"""Stage 2: the spectrum of a weight delta, and its truncated SVD as LoRA factors.

    spectrum.py   exact energy + accurate top-k singular values (``compute_spectrum``, ``Spectrum``)
    factors.py    the best rank-r LoRA factors of a delta (``truncated_svd_factors``)
    threads.py    CPU parallelism: matrices side by side with a share of the BLAS threads each
    kind.py       which spectrum ranks the directions (``SpectrumKind``: weight, input, fisher)
"""

from .factors import truncated_svd_factors
from .kind import SpectrumKind
from .spectrum import Spectrum, SpectrumMethod, compute_spectrum, default_device, resolve_method
from .threads import blas_threads, parallel_plan, spectra_pool

__all__ = ["Spectrum", "SpectrumKind", "SpectrumMethod", "compute_spectrum", "default_device", "resolve_method",
           "truncated_svd_factors", "blas_threads", "parallel_plan", "spectra_pool"]
