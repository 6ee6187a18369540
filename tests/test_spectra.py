"""Spectra against float64 LAPACK references, with explicit tolerances.

Tolerance: every method must match ``torch.linalg.svdvals`` in float64 to 1e-4 relative error on the
returned top-k values (the accuracy the rank decision is designed for); exact methods do far better.
"""

import numpy as np
import pytest
import torch

from lora_ranks.spectra import compute_spectrum

REL_TOL = 1e-4


def _matrix(m, n, spectrum, noise=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    a = (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T
    if noise:
        a += noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / np.sqrt(max(m, n))
    return a.float()


CASES = [
    # (name, m, n, spectrum, noise)
    ("geometric-tall", 600, 200, 0.95 ** np.arange(200), 0.0),
    ("harmonic-wide", 150, 500, 1.0 / np.arange(1, 151), 0.0),
    ("lowrank+noise", 400, 400, [5, 3, 2, 1, 0.5], 0.01),
    ("square-flat", 128, 128, np.ones(128), 0.0),
]


@pytest.mark.parametrize("method", ["gram", "svdvals", "randomized", "auto"])
@pytest.mark.parametrize("name,m,n,spectrum,noise", CASES, ids=[c[0] for c in CASES])
def test_top_k_matches_float64_reference(method, name, m, n, spectrum, noise):
    a = _matrix(m, n, spectrum, noise)
    k = 33
    ref = torch.linalg.svdvals(a.double())[:k].numpy()
    result = compute_spectrum(a, k, method=method, device="cpu", oversample=32)
    exact = result.method in ("gram", "svdvals", "randomized->gram")
    assert result.singular_values.shape == ((min(m, n),) if exact else (k,))  # exact methods keep the whole spectrum
    assert result.singular_values.dtype == np.float64
    assert np.all(np.diff(result.singular_values) <= 1e-12 * ref[0])
    rel = np.abs(result.singular_values[:k] - ref) / ref
    assert rel.max() < REL_TOL, f"{method} on {name}: max relative error {rel.max():.2e} ({result.method})"
    # The energy denominator is exact: float64 sum of squares of every entry.
    energy = float((a.double() ** 2).sum())
    assert abs(result.total_energy - energy) <= 1e-12 * energy


def test_randomized_falls_back_to_exact_on_a_flat_tail():
    a = _matrix(300, 300, [4, 2], noise=0.5)  # a Gaussian noise floor: no gap after index 2
    result = compute_spectrum(a, 40, method="randomized", device="cpu", oversample=10, max_power_iters=4)
    assert result.method == "randomized->gram"
    ref = torch.linalg.svdvals(a.double())[:40].numpy()
    assert np.max(np.abs(result.singular_values[:40] - ref) / ref) < REL_TOL


def test_randomized_converges_on_a_decaying_spectrum_without_fallback():
    a = _matrix(800, 800, 0.9 ** np.arange(300), 0.0)
    result = compute_spectrum(a, 20, method="randomized", device="cpu")
    assert result.method == "randomized"
    assert result.rel_error_bound <= 1e-5


def test_zero_delta_gives_zero_spectrum():
    result = compute_spectrum(torch.zeros(10, 7), 5)
    assert result.total_energy == 0.0 and np.all(result.singular_values == 0) and result.singular_values.shape == (7,)


def test_top_k_is_clipped_to_the_short_side():
    assert compute_spectrum(torch.randn(9, 4), 100, method="randomized").singular_values.shape == (4,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=torch.randn(3)), "2-D"),
    (dict(delta=torch.ones(3, 3, dtype=torch.long)), "floating"),
    (dict(delta=torch.randn(3, 3), top_k=0), "top_k"),
    (dict(delta=torch.randn(3, 3), method="qr"), "method"),
    (dict(delta=torch.randn(3, 3), tol=2.0), "tol"),
])
def test_bad_arguments_are_named(kwargs, match):
    kwargs.setdefault("top_k", 2)
    with pytest.raises(ValueError, match=match):
        compute_spectrum(**kwargs)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64)])
def test_numpy_and_torch_gram_backends_agree(shape):
    """The CPU backend (NumPy dsyrk + dsyevd) and the CUDA backend (torch, run here on the CPU) give the same
    float64 eigenvalues to round-off: |d lambda| <= 1e-12 * lambda_max."""
    from lora_ranks.spectra.spectrum import _gram_eigenvalues_numpy, _gram_eigenvalues_torch

    a = _matrix(*shape, 0.9 ** np.arange(min(shape)), noise=0.01)
    ours = _gram_eigenvalues_numpy(a)
    theirs = _gram_eigenvalues_torch(a).numpy()
    assert ours.shape == theirs.shape == (min(shape),)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * theirs.max())


def test_parallel_plan_splits_the_thread_budget(monkeypatch):
    from lora_ranks.spectra import parallel_plan

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert parallel_plan(7, "cpu") == (2, 1)
    assert parallel_plan(1, "cpu") == (1, 2)  # one matrix keeps every thread
    assert parallel_plan(7, "cuda") == (1, 2)  # the GPU serializes kernels anyway
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert parallel_plan(7, "cpu") == (4, 4)  # max_workers bounds memory; threads fill the budget
    assert parallel_plan(3, "cpu") == (3, 5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert parallel_plan(7, "cpu") == (1, 1)


def test_exactly_low_rank_delta_has_an_exact_zero_tail():
    """A rank-10 delta (a merged LoRA, say): the 10 nonzero values match float64 LAPACK to 1e-9 relative; the
    tail (here ~1e-8 s_1, from storing the matrix in float32) is below the Gram method's resolution and comes
    back as exact zeros, and the reported error bound covers the resolved values (before, the round-off
    values made it ~1e2). Randomized iteration recognizes the same tail as zeros instead of failing its
    relative check and falling back (it did before). LAPACK ``svdvals`` does resolve that tail and keeps it."""
    a = _matrix(300, 120, np.linspace(3.0, 0.5, 10))
    reference = torch.linalg.svdvals(a.double()).numpy()
    gram = compute_spectrum(a, 33, method="gram", device="cpu")
    np.testing.assert_allclose(gram.singular_values[:10], reference[:10], rtol=1e-9)
    assert np.all(gram.singular_values[10:] == 0.0)
    assert gram.rel_error_bound <= 1e-9
    randomized = compute_spectrum(a, 33, method="randomized", device="cpu")
    assert randomized.method == "randomized"  # accepted, no fallback: the zero tail is recognized as such
    np.testing.assert_allclose(randomized.singular_values[:10], reference[:10], rtol=1e-5)
    assert np.all(randomized.singular_values[10:] == 0.0)
    exact = compute_spectrum(a, 33, method="svdvals", device="cpu")
    np.testing.assert_allclose(exact.singular_values, reference, rtol=1e-12, atol=1e-14 * reference[0])
    assert np.all(exact.singular_values[10:33] > 0.0)


def test_auto_uses_the_gram_method_on_the_cpu():
    """On the CPU the exact Gram path beat randomized iteration at every measured shape (see the module
    docstring), so auto never picks randomized there, even where the sketch is narrow (q = 52 of 800)."""
    a = _matrix(800, 800, 0.9 ** np.arange(800))
    assert compute_spectrum(a, 20, method="auto", device="cpu").method == "gram"


def test_blas_limit_holds_until_the_last_concurrent_layer_leaves():
    """Layers running in threads share one process-wide BLAS limit: the first in sets it, an early finisher
    does not lift it under the others, the last one out restores the original."""
    from threadpoolctl import threadpool_info

    from lora_ranks.spectra import blas_threads

    def blas() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    original = blas()
    first, second = blas_threads(1), blas_threads(1)
    first.__enter__()
    second.__enter__()
    assert blas() == {1}
    first.__exit__(None, None, None)
    assert blas() == {1}  # the second layer is still computing
    second.__exit__(None, None, None)
    assert blas() == original


def _cuda_runs_out_of_memory(monkeypatch, fails=lambda delta: True):
    """Make "cuda" computations run on the CPU (this machine may have no GPU), raising ``torch.OutOfMemoryError``
    for the deltas ``fails`` picks; returns the list of deltas (shapes) that failed."""
    from dataclasses import replace

    from lora_ranks.spectra import spectrum as module

    real, failed = module._compute_spectrum, []

    def fake(delta, top_k, method, dev, *args):
        if dev.type != "cuda":
            return real(delta, top_k, method, dev, *args)
        if fails(delta):
            failed.append(tuple(delta.shape))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return replace(real(delta, top_k, method, torch.device("cpu"), *args), device="cuda:0")

    monkeypatch.setattr(module, "_compute_spectrum", fake)
    return failed


def test_cuda_out_of_memory_falls_back_to_the_cpu_and_sets_the_flag(monkeypatch):
    """The fallback is a typed flag (``cuda_oom_fallback``), the values are the CPU's exactly, and the device text
    people read is unchanged; an out-of-memory error on the CPU itself is not hidden."""
    a = _matrix(120, 80, 0.9 ** np.arange(80))
    cpu = compute_spectrum(a, 17, method="gram", device="cpu")
    assert not cpu.cuda_oom_fallback
    failed = _cuda_runs_out_of_memory(monkeypatch)
    fallback = compute_spectrum(a, 17, method="gram", device="cuda")
    assert failed == [(120, 80)]
    assert fallback.cuda_oom_fallback and fallback.device == "cpu (CUDA out of memory)"
    np.testing.assert_array_equal(fallback.singular_values, cpu.singular_values)
    assert (fallback.total_energy, fallback.method, fallback.shape) == (cpu.total_energy, cpu.method, cpu.shape)

    from lora_ranks.spectra import spectrum as module

    def cpu_oom(*args):
        raise torch.OutOfMemoryError("out of memory on the CPU")

    monkeypatch.setattr(module, "_compute_spectrum", cpu_oom)
    with pytest.raises(torch.OutOfMemoryError):
        compute_spectrum(a, 17, device="cpu")


def test_a_layer_result_lists_the_modules_that_fell_back_to_the_cpu(planted_pair, tmp_path, monkeypatch):
    """``LayerResult.cuda_oom_fallbacks`` names exactly the modules whose spectrum CUDA ran out of memory on (what
    the analyze-layer task warns about); the recorded device text stays what it was."""
    from lora_ranks.analysis.layer import analyze_layer
    from lora_ranks.checkpoints import CheckpointPair

    pair = CheckpointPair(*planted_pair)
    modules = [m for m in pair.modules() if m.layer == "model.layers.0"]
    big = max(m.shape[0] * m.shape[1] for m in modules)
    failed = _cuda_runs_out_of_memory(monkeypatch, fails=lambda delta: delta.numel() == big)
    result = analyze_layer(pair, modules, tmp_path / "svd", top_k=9, device="cuda")
    expected = tuple(m.name for m in modules if m.shape[0] * m.shape[1] == big)
    assert expected and len(failed) == len(expected) < len(modules)
    assert result.cuda_oom_fallbacks == expected
    assert {n: d for n, d in result.devices.items() if d != "cuda:0"} == dict.fromkeys(expected, "cpu (CUDA out of memory)")


def test_spectrum_kind_is_its_value_as_a_key_a_string_and_in_json():
    """The enum owns what each kind needs, and a member is interchangeable with its value where strings were used
    (dict keys, f-strings, JSON, comparisons)."""
    import json

    from lora_ranks.spectra import SpectrumKind

    assert {"weight": 1}[SpectrumKind.WEIGHT] == 1 and f"budget-{SpectrumKind.FISHER}" == "budget-fisher"
    assert json.dumps({"s": SpectrumKind.INPUT}) == '{"s": "input"}' and SpectrumKind("fisher") == "fisher"
    assert [k.weighted for k in SpectrumKind] == [False, True, True]
    assert [k.needs_output_factor for k in SpectrumKind] == [False, False, True]


def test_cuda_or_cpu_falls_back_only_from_a_cuda_device_that_ran_out_of_memory():
    from lora_ranks.devices import cuda_or_cpu

    def run(device):
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return device.type

    assert cuda_or_cpu(run, "cuda") == ("cpu", True)  # (empty_cache is a no-op on a machine without CUDA)
    assert cuda_or_cpu(run, "cpu") == ("cpu", False)

    def cpu_oom(device):
        raise torch.OutOfMemoryError("out of memory on the CPU")

    with pytest.raises(torch.OutOfMemoryError):
        cuda_or_cpu(cpu_oom, "cpu")
