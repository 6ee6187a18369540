"""Wide curvature factors kept projected onto a module's short side (``ProjectedCurvature``): the same spectra,
energies and truncations as formed factors, from the collection through the analysis and extraction.

Tolerances: float64 throughout. The projected path takes singular values from the eigenvalues of a Gram, so values
are compared to 1e-8 relative down to 1e-3 of the largest (the Gram's relative error there is ~d eps64 (s_1/s_i)²
~ 1e-10) and to 1e-7 s_1 absolute below (its resolution, sqrt(2 d eps64) s_1, as for the weight spectrum).
"""

import json

import numpy as np
import pytest
import torch

from lora_ranks.kfac import collect_curvature, factor_bytes, plan_passes, projection_side
from lora_ranks.spectra.projected import ProjectedCurvature, projected_spectrum, projected_truncation_factors
from lora_ranks.spectra.weighted import factor_root, weighted_spectrum, weighted_truncation_factors

from .test_curvature import KFAC, _ill_conditioned, _psd, finetuned_pair, tiny  # noqa: F401  (fixtures)


def _assert_same_values(ours: np.ndarray, reference: np.ndarray) -> None:
    n = min(len(ours), len(reference))
    ours, reference = ours[:n], reference[:n]
    big = reference >= 1e-3 * reference[0]
    np.testing.assert_allclose(ours[big], reference[big], rtol=1e-8)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-7 * reference[0])


def _projected(delta, g, a, damping, *, input_only=False) -> ProjectedCurvature:
    """The projected curvature of ``delta`` from formed factors, as the collection would keep it."""
    d_out, d_in = delta.shape
    if d_in <= d_out:  # G is the wide one
        projected = None if input_only else delta.T @ g @ delta
        shift = 0.0 if input_only else damping * float(torch.trace(g)) / d_out
        return ProjectedCurvature("input", factor_root(a, d_in, damping), projected, shift)
    near = factor_root(None if input_only else g, d_out, damping)
    return ProjectedCurvature("output", near, delta @ a @ delta.T, damping * float(torch.trace(a)) / d_in)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 16)], ids=["wide-G", "wide-A", "square"])
@pytest.mark.parametrize("case", ["random", "ill-conditioned", "rank-deficient"])
def test_projected_curvature_equals_formed_factors(case, shape):
    """Spectrum, energy and balanced truncation equal those of the dense Cholesky path (itself equal to the
    eigendecomposition path, ``test_curvature``) on random, ill-conditioned and rank-deficient factors."""
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    if case == "random":
        g, a, damping = _psd(d_out, d_out, 1), _psd(d_in, d_in, 2), 0.01
    elif case == "ill-conditioned":  # eigenvalues over 6 orders of ten
        g, a, damping = _ill_conditioned(d_out, 6, 3), _ill_conditioned(d_in, 6, 4), 1e-4
    else:  # fewer calibration tokens than dimensions: singular factors, made definite by the damping
        g, a, damping = _psd(d_out, 5, 5), _psd(d_in, 3, 6), 0.01
    dense = factor_root(g, d_out, damping), factor_root(a, d_in, damping)
    projected = _projected(delta, g, a, damping)
    reference = weighted_spectrum(delta, 13, output_root=dense[0], input_root=dense[1], method="svdvals")
    ours = projected_spectrum(delta, 13, projected, device="cpu")
    assert ours.method == "projected-gram" and ours.shape == shape
    _assert_same_values(ours.singular_values, reference.singular_values)
    assert ours.total_energy == pytest.approx(reference.total_energy, rel=1e-12)
    for rank in (1, 3, 7):
        a_ours, b_ours, err_ours = projected_truncation_factors(delta, rank, 2.0, projected, device="cpu")
        a_ref, b_ref, err_ref = weighted_truncation_factors(delta, rank, 2.0, output_root=dense[0], input_root=dense[1])
        assert a_ours.shape == (rank, d_in) and b_ours.shape == (d_out, rank) and a_ours.dtype == torch.float32
        product, expected = b_ours.double() @ a_ours.double(), b_ref.double() @ a_ref.double()
        # the factors are float32 (what PEFT stores): products agree to float32 round-off
        torch.testing.assert_close(product, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
        assert err_ours == pytest.approx(err_ref, rel=1e-8, abs=1e-12)
        # balanced like the dense path's: B^T B = A A^T
        torch.testing.assert_close(b_ours.double().T @ b_ours.double(), a_ours.double() @ a_ours.double().T,
                                   rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)], ids=["wide-G", "wide-A"])
def test_input_only_projection_is_the_input_weighted_spectrum(shape):
    """With the G side dropped (the input-weighted spectrum σ(ΔW A^1/2) of a Fisher analysis), the projected form
    gives the dense path's values with an identity output root."""
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    g, a = _psd(d_out, d_out, 7), _psd(d_in, d_in, 8)
    reference = weighted_spectrum(delta, 13, output_root=factor_root(None, d_out, 0.01),
                                  input_root=factor_root(a, d_in, 0.01), method="svdvals")
    ours = projected_spectrum(delta, 13, _projected(delta, g, a, 0.01, input_only=True), device="cpu")
    _assert_same_values(ours.singular_values, reference.singular_values)
    assert ours.total_energy == pytest.approx(reference.total_energy, rel=1e-12)


def test_projection_sides_and_memory():
    """Only a factor wider than the limit, on a module whose other side is within it, is projected; the plan counts
    the near and projected factors and the float32 delta instead of the wide factor."""
    from lora_ranks.checkpoints import ModuleRef

    def ref(shape):
        return ModuleRef("m", "m.weight", shape, "model.layers.0", 0, "m")

    gate, down, q, huge = ref((18944, 3584)), ref((3584, 18944)), ref((3584, 3584)), ref((10000, 10000))
    assert [projection_side(m, "fisher", 8192) for m in (gate, down, q, huge)] == ["input", "output", None, None]
    assert projection_side(gate, "input", 8192) is None  # an input-only spectrum never forms G
    assert projection_side(down, "input", 8192) == "output"
    assert projection_side(gate, "fisher", None) is None
    assert factor_bytes(gate, "fisher", 8192) == 2 * 8 * 3584**2 + 4 * 18944 * 3584
    assert factor_bytes(gate, "fisher") == 8 * (3584**2 + 18944**2)
    assert factor_bytes(down, "input", 8192) == 8 * 3584**2 + 4 * 18944 * 3584  # no G: only ΔW A ΔWᵀ
    # a 7B layer's three wide modules: 8.9 GB of formed factors, 1.4 GB projected with their deltas
    assert sum(factor_bytes(m, "fisher", 8192) for m in (gate, gate, down)) < 0.2 * sum(
        factor_bytes(m, "fisher") for m in (gate, gate, down))


def test_collected_projections_are_the_formed_factors_seen_through_the_delta(tiny):  # noqa: F811
    """Collected with a limit below the MLP width (hidden 32, intermediate 48), gate/up keep ΔWᵀ G ΔW and down keeps
    ΔW A ΔWᵀ: equal to the formed factors of a collection without the limit (same label draws), seen through the
    same delta, to 1e-10 relative; the far traces are the wide factors' traces."""
    model, tokenizer, examples, modules = tiny
    gen = torch.Generator().manual_seed(4)
    deltas = {m.name: torch.randn(*m.shape, generator=gen, dtype=torch.float64) for m in modules}
    options = {**KFAC, "samples": 2, "seed": 3, "batch_size": 4}
    dense = {n: f for layer in collect_curvature(model, examples, tokenizer.pad_token_id, modules, **options)
             for n, f in layer[1].items()}
    projected = {n: f for layer in collect_curvature(model, examples, tokenizer.pad_token_id, modules, **options,
                                                     dense_limit=40, delta_of=lambda m: deltas[m.name])
                 for n, f in layer[1].items()}
    sides = {n: f.projected_side for n, f in projected.items()}
    assert {n.rsplit(".", 1)[1]: s for n, s in sides.items()} == {
        "q_proj": None, "k_proj": None, "v_proj": None, "o_proj": None, "gate_proj": "input", "up_proj": "input",
        "down_proj": "output"}
    for name, f in projected.items():
        reference = dense[name]
        if f.projected_side is None:
            assert torch.equal(f.input_factor, reference.input_factor)
            assert torch.equal(f.output_factor, reference.output_factor)
            continue
        delta = deltas[name]
        if f.projected_side == "input":
            expected, trace = delta.T @ reference.output_factor @ delta, torch.trace(reference.output_factor)
            assert f.output_factor is None and torch.equal(f.input_factor, reference.input_factor)
        else:
            expected, trace = delta @ reference.input_factor @ delta.T, torch.trace(reference.input_factor)
            assert f.input_factor is None and torch.equal(f.output_factor, reference.output_factor)
        assert torch.linalg.norm(f.projected - expected) <= 1e-10 * torch.linalg.norm(expected)
        assert f.far_trace == pytest.approx(float(trace), rel=1e-12)
    # the memory plan fits both layers in one pass at the limit's sizes, as it would without it
    assert len(plan_passes(modules, "fisher", 4 << 30, 40)) == 1


def test_a_projected_module_needs_its_delta(tiny):  # noqa: F811
    model, tokenizer, examples, modules = tiny
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj has a factor wider than 40: .*needs delta_of"):
        list(collect_curvature(model, examples, tokenizer.pad_token_id, modules, **KFAC, dense_limit=40))


@pytest.mark.parametrize("spectrum", ["fisher", "input"])
def test_analysis_and_extraction_with_projected_factors_match_formed_ones(finetuned_pair, tmp_path, spectrum):  # noqa: F811
    """The whole analysis with the MLP factors projected (``dense_factor_limit`` 100 on a hidden-64,
    intermediate-176 model): the curvature files hold no factor wider than the limit, and the stored spectra, the
    chosen ranks and the extracted adapters are those of the analysis with every factor formed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_ranks.analysis import OutputLayout, analyze_checkpoints, load_spectra, spectra_files
    from lora_ranks.extract import extract_lora
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    settings = AllocationSettings(min_rank=1, max_rank=32, smoothing="none")
    configs, svd_dirs = {}, {}
    for label, limit in (("formed", 8192), ("projected", 100)):
        curvature = CurvatureSettings(spectrum=spectrum, fisher_samples=2, curvature_damping=0.01,
                                      min_calibration_tokens=100, dense_factor_limit=limit)
        configs[label] = analyze_checkpoints(base, finetuned, tmp_path / label, settings=settings, curvature=curvature,
                                             calibration_data=data, subset=FinetuneSettings(subset_ratio=0.5))
        svd_dirs[label] = tmp_path / label / "analysis_outputs" / "svd"
    with safe_open(str(svd_dirs["projected"] / "curvature" / "model.layers.1.safetensors"), framework="pt") as f:
        widths = {k: max(f.get_slice(k).get_shape()) for k in f.keys()}
    assert max(widths.values()) <= 100 and any(k.startswith("projected:") for k in widths)
    spectra = {label: load_spectra(spectra_files(d)) for label, d in svd_dirs.items()}
    # The float32 model's per-batch products are formed in float32 in both collections, but at different points
    # (g gᵀ then ΔWᵀ G ΔW, or ΔWᵀ g then its outer product): the spectra agree to float32 round-off, a few eps32
    # of the largest value (measured: at most 3e-7 s_1).
    for name, reference in spectra["formed"].items():
        ours = spectra["projected"][name]
        np.testing.assert_allclose(ours.singular_values, reference.singular_values, rtol=1e-5,
                                   atol=2e-6 * reference.singular_values[0])
        assert ours.total_energy == pytest.approx(reference.total_energy, rel=1e-5)
        if "mlp" not in name:  # attention factors are formed in both: the same numbers
            assert np.array_equal(ours.singular_values, reference.singular_values)
    assert configs["projected"].ranks == configs["formed"].ranks
    adapters = {}
    for label in configs:
        out = tmp_path / f"adapter-{label}"
        extract_lora(base, finetuned, OutputLayout(tmp_path / label).config_path, out)
        adapters[label] = load_file(str(out / "adapter_model.safetensors"))
        assert json.loads((out / "extraction_report.json").read_text())["truncation"] == "curvature"
    for key, b in adapters["formed"].items():
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            expected = b.double() @ adapters["formed"][a_key].double()
            product = adapters["projected"][key].double() @ adapters["projected"][a_key].double()
            torch.testing.assert_close(product, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_the_comparison_checks_refuse_projected_factors_by_name():
    """Allocation fidelity and comparability need formed factors: one error naming a module and the setting."""
    from lora_ranks.analysis import dense_roots
    from lora_ranks.errors import LoraRanksError

    projected = ProjectedCurvature("input", factor_root(None, 3, 0.0), None, 0.0)
    dense = (factor_root(None, 2, 0.0), factor_root(None, 3, 0.0))
    assert dense_roots({"a": dense}, "x") == {"a": dense}
    with pytest.raises(LoraRanksError, match="the allocation fidelity needs formed curvature factors, but b .*"
                                             "raise dense_factor_limit"):
        dense_roots({"a": dense, "b": projected}, "the allocation fidelity")


@pytest.mark.parametrize("d", [1, 5, 512, 513, 1100])
def test_triangular_products_match_the_full_product(d):
    """times_lower (recursive halving, a BLAS trmm) against X @ L and X @ Lᵀ of the explicit triangle, float64, to
    1e-13 relative in the Frobenius norm (matrix-product round-off); the upper triangle it is given is garbage and
    must never be read. The Cholesky FactorRoot's three products go through it."""
    from lora_ranks.spectra.weighted import times_lower

    gen = torch.Generator().manual_seed(d)
    lower = torch.tril(torch.randn(d, d, generator=gen, dtype=torch.float64))
    junk = lower + torch.triu(torch.full((d, d), float("nan"), dtype=torch.float64), 1)  # NaN above the diagonal
    x = torch.randn(37, d, generator=gen, dtype=torch.float64)
    for ours, exact in ((times_lower(x, junk), x @ lower), (times_lower(x, junk, transposed=True), x @ lower.T)):
        assert ours.shape == (37, d) and ours.dtype == torch.float64
        assert float(torch.linalg.norm(ours - exact)) <= 1e-13 * float(torch.linalg.norm(exact))
    samples = torch.randn(d + 8, d, generator=gen, dtype=torch.float64)
    root = factor_root(samples.T @ samples / (d + 8), d, 0.01)  # positive definite
    assert root.kind == "cholesky"
    y = torch.randn(d, 9, generator=gen, dtype=torch.float64)
    for ours, exact in ((root.product(y), root.root @ y), (root.left(y), root.root.T @ y),
                        (root.right(y.T), y.T @ root.root)):
        assert float(torch.linalg.norm(ours - exact)) <= 1e-13 * float(torch.linalg.norm(exact))
