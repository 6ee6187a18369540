"""Loss-aware curvature: K-FAC factors against float64 references, weighted spectra and the weighted truncation
against exact and brute-force references."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_ranks.checkpoints import ModuleRef
from lora_ranks.data import tokenize_record
from lora_ranks.kfac import CalibrationError, collect_curvature, length_batches, plan_passes, sample_labels
from lora_ranks.spectra.weighted import symmetric_root, weighted_spectrum, weighted_truncation_factors
from lora_ranks.synthetic import synthetic_records, train_tokenizer

#: ``collect_curvature``'s options for these tests (4 label draws, 8 records a batch, 4 GiB of factors at once).
KFAC = {"kind": "fisher", "samples": 4, "seed": 0, "batch_size": 8, "memory_bytes": 4 << 30}


@pytest.fixture(scope="module")
def tiny():
    """A float64 two-layer Qwen3 (hidden 32), its tokenizer, tokenized records and its target modules."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    records = synthetic_records(3, fmt="mixed", seed=5)
    tokenizer = train_tokenizer([str(r) for r in records] * 3, vocab_size=300)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config).double().eval()
    examples = [tokenize_record(r, tokenizer, 256) for r in records]
    modules = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            depth = int(name.split(".")[2])
            modules.append(ModuleRef(name, name + ".weight", tuple(module.weight.shape), f"model.layers.{depth}",
                                     depth, name.split(".")[-1]))
    return model, tokenizer, examples, modules


def _reference_factors(model, tokenizer, examples, module_name, samples, seed, batch_size):
    """A and G of one module by another route: its output replaced by a leaf tensor, gradients by autograd.grad,
    the inputs captured by a forward pre-hook, products accumulated in explicit float64 loops over positions."""
    from lora_ranks.data import collate

    module = dict(model.named_modules())[module_name]
    generator = torch.Generator().manual_seed(seed)
    a = g = None
    tokens = 0
    for indices in length_batches(examples, batch_size):  # the batches the collection runs (draws follow them)
        batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
        mask = batch["attention_mask"].bool()
        captured = {}

        def pre(mod, args, captured=captured):
            captured["x"] = args[0].detach().clone()

        def replace(mod, args, output, captured=captured):
            captured["y"] = output.detach().clone().requires_grad_(True)
            return captured["y"]

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(replace)]
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            x = captured["x"]
            for b, t in mask.nonzero().tolist():
                outer = torch.outer(x[b, t], x[b, t])
                a = outer if a is None else a + outer
                tokens += 1
            for _ in range(samples):
                sampled = sample_labels(logits, batch["labels"], generator)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         sampled[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
                (grad,) = torch.autograd.grad(loss, captured["y"], retain_graph=True)
                for b, t in mask.nonzero().tolist():
                    outer = torch.outer(grad[b, t], grad[b, t])
                    g = outer if g is None else g + outer
        finally:
            for h in handles:
                h.remove()
    return a / tokens, g / (tokens * samples)


@pytest.mark.parametrize("module_name", ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                         "model.layers.1.self_attn.o_proj"])
def test_fisher_factors_match_a_float64_reference(tiny, module_name):
    """Relative Frobenius error <= 1e-10 (float64 throughout; the same label draws by construction)."""
    model, tokenizer, examples, modules = tiny
    layers = dict(collect_curvature(model, examples, tokenizer.pad_token_id, modules,
                                    **{**KFAC, "samples": 2, "seed": 3, "batch_size": 2}))
    ours = next(f for layer in layers.values() for n, f in layer.items() if n == module_name)
    a_ref, g_ref = _reference_factors(model, tokenizer, examples, module_name, samples=2, seed=3, batch_size=2)
    assert torch.linalg.norm(ours.input_factor - a_ref) <= 1e-10 * torch.linalg.norm(a_ref)
    assert torch.linalg.norm(ours.output_factor - g_ref) <= 1e-10 * torch.linalg.norm(g_ref)
    assert ours.tokens == sum(len(e["input_ids"]) for e in examples)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were accumulated


def test_memory_budget_splits_passes_without_changing_the_factors(tiny):
    model, tokenizer, examples, modules = tiny
    one_pass = dict(collect_curvature(model, examples, tokenizer.pad_token_id, modules,
                                      **{**KFAC, "samples": 1, "seed": 1}))
    assert plan_passes(modules, "fisher", 1) == [["model.layers.0"], ["model.layers.1"]]
    per_layer = dict(collect_curvature(model, examples, tokenizer.pad_token_id, modules,
                                       **{**KFAC, "samples": 1, "seed": 1, "memory_bytes": 1}))
    for layer, factors in one_pass.items():
        for name, f in factors.items():
            assert torch.equal(f.input_factor, per_layer[layer][name].input_factor)
            assert torch.equal(f.output_factor, per_layer[layer][name].output_factor)


def test_modules_reading_one_input_share_one_factor(tiny):
    model, tokenizer, examples, modules = tiny
    factors = dict(collect_curvature(model, examples, tokenizer.pad_token_id, modules,
                                     **{**KFAC, "kind": "input"}))["model.layers.0"]
    q, k, v, o, gate, up, down = (factors[f"model.layers.0.{p}"] for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"))
    assert q.input_factor is k.input_factor is v.input_factor and gate.input_factor is up.input_factor
    assert o.input_factor is not q.input_factor and down.input_factor is not gate.input_factor
    assert q.output_factor is None  # input-only curvature needs no backward pass


def test_no_records_is_a_clear_error(tiny):
    model, tokenizer, _, modules = tiny
    with pytest.raises(CalibrationError, match="no calibration records"):
        list(collect_curvature(model, [], tokenizer.pad_token_id, modules, **KFAC))


# -- weighted spectra and truncation -------------------------------------------------------------------------
def _psd(d, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank, generator=gen, dtype=torch.float64)
    return x @ x.T / rank


def _sqrtm(c):
    """Symmetric square root by Newton-Schulz (Higham 2008, ch. 6): independent of eigh."""
    norm = torch.linalg.norm(c)
    y, z = c / norm, torch.eye(c.shape[0], dtype=c.dtype)
    for _ in range(60):
        t = 0.5 * (3 * torch.eye(c.shape[0], dtype=c.dtype) - z @ y)
        y, z = y @ t, t @ z
    return y * norm.sqrt()


@pytest.mark.parametrize("damping", [0.05, 0.5])
def test_weighted_spectrum_equals_the_svd_of_the_weighted_delta(damping):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    a, g = _psd(12, 5, 1), _psd(20, 7, 2)  # rank-deficient, as calibration factors often are
    in_root, out_root = symmetric_root(a, 12, damping), symmetric_root(g, 20, damping)
    spectrum = weighted_spectrum(delta, 13, output_root=out_root, input_root=in_root, method="svdvals")
    a_d = a + damping * torch.trace(a) / 12 * torch.eye(12, dtype=torch.float64)
    g_d = g + damping * torch.trace(g) / 20 * torch.eye(20, dtype=torch.float64)
    reference = torch.linalg.svdvals(_sqrtm(g_d) @ delta @ _sqrtm(a_d))
    torch.testing.assert_close(torch.from_numpy(spectrum.singular_values[:12]), reference, rtol=1e-9, atol=0)
    assert spectrum.total_energy == pytest.approx(float(torch.trace(g_d @ delta @ a_d @ delta.T)), rel=1e-12)


def test_identity_factors_give_the_plain_spectrum_and_truncation():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    eye_out, eye_in = symmetric_root(None, 16, 0.0), symmetric_root(None, 9, 0.0)
    weighted = weighted_spectrum(delta, 9, output_root=eye_out, input_root=eye_in, method="svdvals")
    torch.testing.assert_close(torch.from_numpy(weighted.singular_values), torch.linalg.svdvals(delta), rtol=1e-12, atol=0)
    lora_a, lora_b, _ = weighted_truncation_factors(delta, 3, 2.0, output_root=eye_out, input_root=eye_in)
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(2.0 * lora_b.double() @ lora_a.double(), best, rtol=0, atol=1e-6)  # float32 factors


def _objective(delta, low_rank, g_root, a_root):
    return float(torch.linalg.norm(g_root @ (delta - low_rank) @ a_root) ** 2)


def test_weighted_truncation_is_optimal_against_brute_force():
    """The closed form (SVD of G^1/2 dW A^1/2, mapped back) reaches the minimum that direct numerical optimization
    of ||G^1/2 (dW - B C) A^1/2|| over all rank-2 factor pairs finds (L-BFGS, 12 random starts), to 1e-8."""
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    a, g = _psd(6, 6, 3) + 0.1 * torch.eye(6, dtype=torch.float64), _psd(8, 8, 4) + 0.1 * torch.eye(8, dtype=torch.float64)
    in_root, out_root = symmetric_root(a, 6, 0.0), symmetric_root(g, 8, 0.0)
    lora_a, lora_b, rel = weighted_truncation_factors(delta, 2, 1.0, output_root=out_root, input_root=in_root)
    g_half, a_half = _sqrtm(g), _sqrtm(a)
    ours = _objective(delta, lora_b.double() @ lora_a.double(), g_half, a_half)
    best = float("inf")
    for start in range(12):
        init = torch.Generator().manual_seed(100 + start)
        b = torch.randn(8, 2, generator=init, dtype=torch.float64, requires_grad=True)
        c = torch.randn(2, 6, generator=init, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([b, c], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      line_search_fn="strong_wolfe")

        def closure(optimizer=optimizer, b=b, c=c):
            optimizer.zero_grad()
            loss = torch.linalg.norm(g_half @ (delta - b @ c) @ a_half) ** 2
            loss.backward()
            return loss

        optimizer.step(closure)
        best = min(best, _objective(delta, (b @ c).detach(), g_half, a_half))
    assert ours <= best * (1 + 1e-6) + 1e-12  # float32 factors: relative 1e-6
    assert best <= ours * (1 + 1e-6) + 1e-12
    total = float(torch.linalg.norm(g_half @ delta @ a_half) ** 2)
    assert rel == pytest.approx((ours / total) ** 0.5, rel=1e-5)
    plain_u, plain_s, plain_vh = torch.linalg.svd(delta)
    plain = (plain_u[:, :2] * plain_s[:2]) @ plain_vh[:2]
    assert ours < _objective(delta, plain, g_half, a_half)  # the weighting changes the best choice


def test_damping_keeps_singular_factors_bounded():
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    a = torch.zeros(8, 8, dtype=torch.float64)
    a[:3, :3] = _psd(3, 3, 5)  # five input directions never excited
    for damping in (1e-3, 1e-1, 1e6):
        lora_a, lora_b, _ = weighted_truncation_factors(delta, 2, 1.0, output_root=symmetric_root(None, 10, 0.0),
                                                        input_root=symmetric_root(a, 8, damping))
        assert torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()
    # heavy damping: the plain truncated SVD again
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(lora_b.double() @ lora_a.double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-4)


def test_labels_are_sampled_from_the_model_where_the_data_trains():
    """Position t of the sampled labels is drawn from the logits at t-1 (next-token prediction), only where the
    data has a label; a distribution peaked on token k always yields k."""
    logits = torch.full((2, 5, 11), -1e9, dtype=torch.float64)
    for t in range(5):
        logits[:, t, t + 3] = 0.0  # position t predicts token t + 3 with probability 1
    labels = torch.tensor([[-100, -100, 4, 9, 1], [-100, 2, -100, -100, 6]])
    sampled = sample_labels(logits, labels, torch.Generator().manual_seed(0))
    expected = torch.tensor([[-100, -100, 4, 5, 6], [-100, 3, -100, -100, 6]])
    assert torch.equal(sampled, expected)


# -- in the analysis -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned_pair(tmp_path_factory):
    """A tiny Qwen3 fine-tuned briefly on synthetic records: (base, fine-tuned, data)."""
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.settings import FinetuneSettings
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    root = tmp_path_factory.mktemp("ft")
    base = build_tiny_qwen3(root / "base", num_layers=2)
    data = write_synthetic_dataset(root / "data.jsonl", 20, fmt="mixed")
    result = run_preliminary_finetune(base, data, root / "out", FinetuneSettings(subset_ratio=0.5, max_steps=8,
                                                                                 learning_rate=3e-3), progress=False)
    return result.pretrained_dir, result.finetuned_dir, data


@pytest.mark.parametrize("spectrum", ["input", "fisher"])
def test_analysis_with_a_curvature_spectrum(finetuned_pair, tmp_path, spectrum):
    import numpy as np

    from lora_ranks.analysis import analyze_checkpoints, load_curvature_file, load_spectra, spectra_files
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    settings = AllocationSettings(min_rank=1, max_rank=32, smoothing="none")
    curvature = CurvatureSettings(spectrum=spectrum, fisher_samples=2, curvature_damping=0.01, min_calibration_tokens=100)
    config = analyze_checkpoints(base, finetuned, tmp_path / spectrum, settings=settings, curvature=curvature,
                                 calibration_data=data, subset=FinetuneSettings(subset_ratio=0.5))
    modules = config.modules
    assert {m.spectrum for m in modules.values()} == {spectrum}
    assert all(isinstance(m.signal_rank, int) and m.noise_threshold >= 0 for m in modules.values())
    record = config.analysis_metadata.curvature
    assert record.settings.spectrum == spectrum and record.tokens >= 100 and record.silent_modules == []
    # the stored main spectrum of a module is that of G^1/2 dW A^1/2 with the stored factors
    svd_dir = tmp_path / spectrum / "analysis_outputs" / "svd"
    name = "model.layers.1.mlp.down_proj"
    factors = load_curvature_file(svd_dir / "curvature" / "model.layers.1.safetensors")[name]
    pair = CheckpointPair(base, finetuned)
    delta = pair.delta(next(m for m in pair.modules() if m.name == name), torch.float64)
    a = factors.input_factor + 0.01 * torch.trace(factors.input_factor) / delta.shape[1] * torch.eye(delta.shape[1],
                                                                                                   dtype=torch.float64)
    weighted = delta @ _sqrtm(a)
    if spectrum == "fisher":
        g = factors.output_factor
        weighted = _sqrtm(g + 0.01 * torch.trace(g) / delta.shape[0] * torch.eye(delta.shape[0], dtype=torch.float64)) @ weighted
    reference = torch.linalg.svdvals(weighted).numpy()
    ours = load_spectra(spectra_files(svd_dir))[name].singular_values[:len(reference)]
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * reference[0])  # values below the resolution are 0
    weight = load_spectra(spectra_files(svd_dir), weight=True)[name].singular_values
    np.testing.assert_allclose(weight[:5], torch.linalg.svdvals(delta).numpy()[:5], rtol=1e-9)


def test_calibration_with_too_few_tokens_is_refused_naming_the_file(finetuned_pair, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import CurvatureSettings

    base, finetuned, data = finetuned_pair
    with pytest.raises(CalibrationError, match=rf"calibration data {data}: the subset of \d+ of 100 records has \d+ tokens"):
        analyze_checkpoints(base, finetuned, tmp_path, curvature=CurvatureSettings(spectrum="fisher",
                                                                                  min_calibration_tokens=10**7),
                            calibration_data=data)
    with pytest.raises(CalibrationError, match="needs calibration records"):
        analyze_checkpoints(base, finetuned, tmp_path, curvature=CurvatureSettings(spectrum="fisher"))
    assert not (tmp_path / "configs").exists()


def test_calibration_records_cap_the_calibration_set_keeping_it_stratified(finetuned_pair):
    from transformers import AutoTokenizer

    from lora_ranks.analysis import calibration_examples
    from lora_ranks.data import load_records
    from lora_ranks.settings import CurvatureSettings, FinetuneSettings

    _, finetuned, data = finetuned_pair
    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    subset = FinetuneSettings(subset_ratio=0.5)
    whole = calibration_examples(data, tokenizer, subset, CurvatureSettings(min_calibration_tokens=1))
    capped = calibration_examples(data, tokenizer, subset, CurvatureSettings(min_calibration_tokens=1,
                                                                             calibration_records=6))
    assert len(whole) == 50 and len(capped) == 6
    # the capped set is the stratified 6-record subset: every task keeps its share
    from lora_ranks.data import stratified_subset, tokenize_record

    chosen, report = stratified_subset(load_records(data), 0.5, 6, seed=subset.seed, task_key="task")
    assert len(report.counts_after) > 1
    expected = [tokenize_record(r, tokenizer, subset.max_length)["input_ids"] for r in chosen]
    assert [e["input_ids"] for e in capped] == expected
    with pytest.raises(CalibrationError, match="more calibration_records"):
        calibration_examples(data, tokenizer, subset, CurvatureSettings(calibration_records=1,
                                                                        min_calibration_tokens=10**4))


def test_signal_rule_reads_the_noise_floor(finetuned_pair, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import AllocationSettings

    base, finetuned, _ = finetuned_pair
    config = analyze_checkpoints(base, finetuned, tmp_path, settings=AllocationSettings(
        rank_rule="signal", min_rank=1, max_rank=64, smoothing="none"))
    for meta in config.modules.values():
        assert meta.raw_rank == meta.signal_rank
        assert meta.final_rank == min(max(meta.signal_rank, 1), 64, min(meta.shape))


def test_extraction_with_the_curvature_truncation(finetuned_pair, tmp_path):
    """auto on a fisher config: every module is G^-1/2 (G^1/2 dW A^1/2)_r A^-1/2 (damped), which beats the plain
    truncated SVD on the weighted objective; asking curvature of a weight config is refused."""
    from safetensors import safe_open

    from lora_ranks.analysis import analyze_checkpoints, load_curvature_file
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import RankConfigError
    from lora_ranks.extract import extract_lora
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, ExtractionSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    curvature = CurvatureSettings(spectrum="fisher", fisher_samples=2, min_calibration_tokens=100)
    analyze_checkpoints(base, finetuned, tmp_path / "an", settings=AllocationSettings(min_rank=2, max_rank=8),
                        curvature=curvature, calibration_data=data, subset=FinetuneSettings(subset_ratio=0.5))
    config_path = tmp_path / "an" / "configs" / "lora_rank_config.json"
    ours = extract_lora(base, finetuned, config_path, tmp_path / "fisher")
    plain = extract_lora(base, finetuned, config_path, tmp_path / "plain", settings=ExtractionSettings(truncation="weight"))
    assert ours.truncation == "curvature" and plain.truncation == "weight"
    name = "model.layers.0.self_attn.v_proj"
    rank, scale = ours.modules[name].rank, ours.modules[name].scale
    factors = load_curvature_file(tmp_path / "an" / "analysis_outputs" / "svd" / "curvature" / "model.layers.0.safetensors")[name]
    pair = CheckpointPair(base, finetuned)
    delta = pair.delta(next(m for m in pair.modules() if m.name == name), torch.float64)
    d_out, d_in = delta.shape
    a = factors.input_factor + 0.01 * torch.trace(factors.input_factor) / d_in * torch.eye(d_in, dtype=torch.float64)
    g = factors.output_factor + 0.01 * torch.trace(factors.output_factor) / d_out * torch.eye(d_out, dtype=torch.float64)
    g_half, a_half = _sqrtm(g), _sqrtm(a)
    u, s, vh = torch.linalg.svd(g_half @ delta @ a_half)
    reference = torch.linalg.inv(g_half) @ ((u[:, :rank] * s[:rank]) @ vh[:rank]) @ torch.linalg.inv(a_half)

    def adapter(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as h:
            lora_a = h.get_tensor(f"base_model.model.{name}.lora_A.weight").double()
            lora_b = h.get_tensor(f"base_model.model.{name}.lora_B.weight").double()
        return scale * lora_b @ lora_a

    torch.testing.assert_close(adapter(tmp_path / "fisher"), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    assert _objective(delta, adapter(tmp_path / "fisher"), g_half, a_half) < _objective(delta, adapter(tmp_path / "plain"),
                                                                                         g_half, a_half)
    analyze_checkpoints(base, finetuned, tmp_path / "weight")
    with pytest.raises(RankConfigError, match="made from the weight spectrum"):
        extract_lora(base, finetuned, tmp_path / "weight" / "configs" / "lora_rank_config.json", tmp_path / "x",
                     settings=ExtractionSettings(truncation="curvature"))


def test_spearman_against_known_orders():
    from lora_ranks.evidence import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])


def test_module_sensitivities_measure_what_one_truncation_adds(finetuned_pair):
    """Truncating at full rank changes nothing (KL at round-off); at rank 1 every module adds KL, and the plain
    basis predicts its discarded energy."""
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.evidence import DeltaBasis, module_sensitivities
    from lora_ranks.loading import load_model

    base, finetuned, data = finetuned_pair
    model, tokenizer = load_model(finetuned, dtype=torch.float64)
    pair = CheckpointPair(base, finetuned)
    modules = pair.modules()[:3]
    basis = DeltaBasis(pair, modules)
    examples = [tokenize_record(r, tokenizer, 256) for r in synthetic_records(2, fmt="instruction", seed=9)]
    full = module_sensitivities(model, basis, examples, tokenizer.pad_token_id, rank=64)
    assert all(abs(s.measured_kl) < 1e-12 and s.predicted == pytest.approx(0.0, abs=1e-20) for s in full)
    one = module_sensitivities(model, basis, examples, tokenizer.pad_token_id, rank=1, scale=1.0)
    for s, m in zip(one, modules):
        assert s.measured_kl > 0
        assert s.predicted == pytest.approx(float(torch.sum(torch.linalg.svdvals(pair.delta(m, torch.float64))[1:] ** 2)))


def test_a_module_the_calibration_never_runs_falls_back_to_its_weight_spectrum(tiny, finetuned_pair, tmp_path):
    """A module that no calibration record reaches (a vision tower with text-only data, say) is reported as silent
    by the collection, and the analysis ranks it by its weight spectrum with the reason in the config."""
    import warnings

    from lora_ranks.analysis import analyze_checkpoints, analyze_layer, assemble_rank_config, load_curvature_file
    from lora_ranks.analysis.curvature import _write
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    model, tokenizer, examples, modules = tiny
    model.model.unused = torch.nn.Linear(32, 32).double()  # registered, never called in forward
    silent = ModuleRef("model.unused", "model.unused.weight", (32, 32), "model.layers.0", 0, "unused")
    try:
        factors = dict(collect_curvature(model, examples, tokenizer.pad_token_id, [*modules, silent],
                                         **{**KFAC, "samples": 1}))
    finally:
        del model.model.unused
    assert not factors["model.layers.0"]["model.unused"].fired
    assert factors["model.layers.0"]["model.layers.0.self_attn.q_proj"].fired

    base, finetuned, data = finetuned_pair
    curvature = CurvatureSettings(spectrum="fisher", fisher_samples=1, min_calibration_tokens=100)
    out = tmp_path / "an"
    config = analyze_checkpoints(base, finetuned, out, settings=AllocationSettings(min_rank=1, max_rank=16),
                                 curvature=curvature, calibration_data=data, subset=FinetuneSettings(subset_ratio=0.5))
    # rewrite layer 1's factors as if its down_proj had never run, and analyze again from those factors
    path = out / "analysis_outputs" / "svd" / "curvature" / "model.layers.1.safetensors"
    layer = load_curvature_file(path)
    name = "model.layers.1.mlp.down_proj"
    layer[name].fired = False
    _write(path, "model.layers.1", layer, "fisher")
    pair = CheckpointPair(base, finetuned)
    svd = out / "analysis_outputs" / "svd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = [analyze_layer(pair, [m for m in pair.modules() if m.layer == layer], svd, top_k=17,
                                 curvature_path=svd / "curvature" / f"{layer}.safetensors", damping=0.01)
                   for layer in ("model.layers.0", "model.layers.1")]
    assert config.analysis_metadata.fallback_modules == {}
    again, _ = assemble_rank_config(pair, pair.modules(), results, AllocationSettings(min_rank=1, max_rank=16),
                                    tmp_path / "again.json")
    modules_meta = again.modules
    assert modules_meta[name].spectrum == "weight" and "never ran" in modules_meta[name].fallback
    assert modules_meta["model.layers.1.mlp.up_proj"].spectrum == "fisher"
    assert list(again.analysis_metadata.fallback_modules) == [name]


def test_weighted_truncation_factors_are_balanced():
    """Same product as the obvious split G^-1/2 U sqrt(S), sqrt(S) V^T A^-1/2, but with B^T B = A A^T diagonal and equal
    (the SVD split, like the plain truncated SVD's), even when G is tiny (gradient second moments) and A ill-conditioned."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    g = 1e-8 * (_psd(10, 10, 5) + 0.1 * torch.eye(10, dtype=torch.float64))
    a = _psd(7, 7, 4) + 1e-3 * torch.eye(7, dtype=torch.float64)
    out_root, in_root = symmetric_root(g, 10, 0.0), symmetric_root(a, 7, 0.0)
    lora_a, lora_b, _ = weighted_truncation_factors(delta, 3, 2.0, output_root=out_root, input_root=in_root)
    lora_a, lora_b = lora_a.double(), lora_b.double()
    m = _sqrtm(g) @ delta @ _sqrtm(a)
    u, s, vh = torch.linalg.svd(m)
    obvious = torch.linalg.inv(_sqrtm(g)) @ u[:, :3] @ torch.diag(s[:3]) @ vh[:3] @ torch.linalg.inv(_sqrtm(a))
    assert torch.allclose(2.0 * lora_b @ lora_a, obvious, rtol=1e-5, atol=1e-6 * float(obvious.abs().max()))
    gram_b, gram_a = lora_b.T @ lora_b, lora_a @ lora_a.T
    assert torch.allclose(gram_b, gram_a, rtol=1e-5, atol=1e-7 * float(gram_b.abs().max()))
    assert torch.allclose(gram_b, torch.diag(torch.diagonal(gram_b)), atol=1e-5 * float(gram_b.abs().max()))


# -- the comparison's matrix: input-weighted spectra from Fisher factors, signal ranks, fidelity, comparability -----
@pytest.fixture(scope="module")
def fisher_analysis(finetuned_pair, tmp_path_factory):
    """A Fisher analysis and an input-only analysis of the same pair on the same calibration records."""
    from lora_ranks.analysis import OutputLayout, analyze_checkpoints
    from lora_ranks.settings import AllocationSettings, CurvatureSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    root = tmp_path_factory.mktemp("matrix")
    layouts = {}
    for spectrum in ("fisher", "input"):
        layouts[spectrum] = OutputLayout(root / spectrum)
        analyze_checkpoints(base, finetuned, layouts[spectrum].root,
                            settings=AllocationSettings(min_rank=1, max_rank=32, smoothing="none"),
                            curvature=CurvatureSettings(spectrum=spectrum, min_calibration_tokens=100),
                            calibration_data=data, subset=FinetuneSettings(subset_ratio=0.5))
    return layouts


def test_input_weighted_spectra_from_fisher_factors_equal_an_input_analysis(fisher_analysis):
    """The A factors a Fisher pass collects are those an input-only pass collects (same records, same forward), so
    sigma(dW A^1/2) from the Fisher analysis' files is the input analysis' spectrum."""
    from lora_ranks.analysis import input_weighted_spectra, load_spectra, spectra_files
    from lora_ranks.config import load_rank_config

    fisher, inputs = fisher_analysis["fisher"], fisher_analysis["input"]
    config = load_rank_config(fisher.config_path)
    modules = config.module_refs()
    ours = input_weighted_spectra(config, modules, load_spectra(spectra_files(fisher.svd_dir), weight=True))
    reference = load_spectra(spectra_files(inputs.svd_dir))
    for m in modules:
        top = reference[m.name].singular_values[0]
        np.testing.assert_allclose(ours[m.name].singular_values, reference[m.name].singular_values, rtol=1e-6,
                                   atol=1e-9 * top)
        assert ours[m.name].total_energy == pytest.approx(reference[m.name].total_energy, rel=1e-9)


def test_matrix_configs_fidelity_and_comparability(fisher_analysis, finetuned_pair, tmp_path):
    """At a budget: every allocation (water-filling on the weight, input and Fisher spectra) fits it, the signal
    ranks are the analysis' bounded signal ranks, full ranks reach the ceiling KL with either truncation, uniform
    ranks define excess ratio 1, and the comparability check covers every module for the three spectra."""
    from lora_ranks.config import load_rank_config, save_rank_config
    from lora_ranks.evidence import allocation_fidelity, comparability_check
    from lora_ranks.evidence.comparison import ComparisonLayout, write_allocation_configs
    from lora_ranks.evidence.experiment import config_from_ranks, parameters_of
    from lora_ranks.settings import ComparisonSettings, FidelitySettings

    base, finetuned, data = finetuned_pair
    fisher = fisher_analysis["fisher"]
    analysis = load_rank_config(fisher.config_path)
    modules = analysis.module_refs()
    layout = ComparisonLayout(tmp_path)
    shutil.copytree(Path(fisher.config_path).parents[1], layout.analysis.root)  # the analysis run, where a compare puts it
    configs = write_allocation_configs(fisher.config_path, layout, budget_ranks=(2,))
    assert set(configs) == {"r2-uniform", "r2-energy", "r2-budget-weight", "r2-budget-input", "r2-budget-fisher", "signal"}
    budget = 2 * sum(sum(m.shape) for m in modules)
    for label, path in configs.items():
        config = load_rank_config(path)
        if label != "signal":
            assert config.trainable_parameters <= budget and config.analysis_metadata.budget_rank == 2
    signal = load_rank_config(configs["signal"]).modules
    assert {n: m.final_rank for n, m in signal.items()} == {
        n: max(1, min(32, m.signal_rank)) for n, m in analysis.modules.items()}

    full_ranks = {m.name: min(m.shape) for m in modules}
    full = config_from_ranks(modules, full_ranks, analysis.base_parameters, max_rank=max(full_ranks.values()),
                             extra_metadata={"allocation": "full", "curvature": analysis.analysis_metadata.curvature})
    configs["full"] = str(save_rank_config(layout.config_path("full"), full))
    assert parameters_of(modules, full_ranks) == full.trainable_parameters
    table = allocation_fidelity(fisher.config_path, configs, data, layout, FidelitySettings(eval_samples=6))
    rows = {(r["allocation"], r["truncation"]): r for r in table.rows}
    assert set(rows) == {(label, t) for label in configs for t in ("weight", "fisher")}
    assert rows[("full", "weight")]["kl"] == table.ceiling_kl
    assert rows[("full", "fisher")]["kl"] == pytest.approx(table.ceiling_kl, abs=1e-9)
    assert rows[("r2-uniform", "weight")]["excess_ratio"] == 1.0
    assert all(r["kl"] > table.ceiling_kl for (label, _), r in rows.items() if label.startswith("r2-"))
    assert (tmp_path / "allocation_fidelity.json").is_file()
    stamp = (tmp_path / "allocation_fidelity.json").stat().st_mtime_ns
    again = allocation_fidelity(fisher.config_path, configs, data, layout, FidelitySettings(eval_samples=6))
    assert again.rows == table.rows and (tmp_path / "allocation_fidelity.json").stat().st_mtime_ns == stamp  # reused
    fewer = allocation_fidelity(fisher.config_path, configs, data, layout, FidelitySettings(eval_samples=4))
    assert fewer.rows != table.rows  # other settings: measured again

    report = comparability_check(fisher.config_path, data, layout, ComparisonSettings(comparability_records=4),
                                 FidelitySettings())
    assert set(report.spearman) == {"weight", "input", "fisher"}
    assert all(-1 <= v <= 1 for v in report.spearman.values())
    saved = json.loads((tmp_path / "sensitivity.json").read_text())["spectra"]
    assert all(len(saved[kind]["rows"]) == len(modules) for kind in saved)
    assert Path(report.plot_path).stat().st_size > 5_000


# -- the split-half noise estimate --------------------------------------------------------------------------------
def test_split_half_records_partition_the_subset_keeping_the_task_mix(finetuned_pair):
    from collections import Counter

    from lora_ranks.data import load_records, stratified_subset
    from lora_ranks.finetune import split_half_records
    from lora_ranks.settings import FinetuneSettings

    _, _, data = finetuned_pair
    settings = FinetuneSettings(subset_ratio=0.5)
    a, b = split_half_records(data, settings)
    subset, _ = stratified_subset(load_records(data), 0.5, settings.max_samples, seed=settings.seed)
    as_json = lambda records: Counter(json.dumps(r, sort_keys=True) for r in records)  # noqa: E731
    assert as_json(a) + as_json(b) == as_json(subset) and not (as_json(a) & as_json(b))
    tasks_a, tasks_b = Counter(r["task"] for r in a), Counter(r["task"] for r in b)
    assert set(tasks_a) == set(tasks_b) and all(abs(tasks_a[t] - tasks_b[t]) <= 1 for t in tasks_a)


def test_split_half_noise_estimate_ranks_by_the_shared_directions(finetuned_pair, tmp_path):
    """With noise_estimate split-half, two fine-tunes on the halves run, every module records the directions
    their deltas share (recomputed here from the two checkpoints), and the signal rule keeps that many."""
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.noise import split_half_rank, subspace_agreement
    from lora_ranks.settings import AllocationSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    settings = AllocationSettings(rank_rule="signal", noise_estimate="split-half", min_rank=1, max_rank=16,
                                  smoothing="none")
    subset = FinetuneSettings(subset_ratio=0.5, max_steps=8, learning_rate=3e-3)
    config = analyze_checkpoints(base, finetuned, tmp_path, settings=settings, calibration_data=data, subset=subset)
    halves = [tmp_path / "saved_models" / "split_half" / h / "finetuned" for h in ("half-a", "half-b")]
    assert all((h / "model.safetensors").is_file() for h in halves)
    meta = config.analysis_metadata
    name = "model.layers.1.mlp.down_proj"
    module = next(m for m in config.module_refs() if m.name == name)
    deltas = [CheckpointPair(base, h).delta(module, torch.float64) for h in halves]
    agreement = subspace_agreement(*deltas, min(16, min(module.shape) // 2))
    assert meta.split_half[name].agreement == pytest.approx(agreement.tolist(), abs=1e-6)
    for n, m in meta.modules.items():
        assert m.split_half_rank == split_half_rank(meta.split_half[n].agreement)
        assert m.raw_rank == m.split_half_rank and isinstance(m.signal_rank, int)
    # the two estimates differ here (the noise-floor ranks are larger), so the rule's choice is seen
    assert any(m.split_half_rank != m.signal_rank for m in meta.modules.values())


def test_split_half_without_data_is_refused_before_any_work(finetuned_pair, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import AllocationSettings

    base, finetuned, _ = finetuned_pair
    with pytest.raises(CalibrationError, match="split-half' needs the fine-tuning data"):
        analyze_checkpoints(base, finetuned, tmp_path / "out", settings=AllocationSettings(noise_estimate="split-half"))
    assert not (tmp_path / "out").exists()


def _ill_conditioned(d: int, condition: float, seed: int) -> torch.Tensor:
    """An SPD matrix (d, d), float64, with eigenvalues spread log-uniformly over ``condition`` orders of ten."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.logspace(0, -condition, d, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("case", ["random", "ill-conditioned", "rank-deficient"])
def test_cholesky_roots_equal_the_eigendecomposition_path(case):
    """For G = L_G L_G^T and A = L_A L_A^T (damped), sigma(L_G^T dW L_A) = sigma(G^1/2 dW A^1/2) and the loss-aware
    truncation recovered with triangular solves is the same matrix: the spectrum, the energy and the balanced
    factors agree with the eigendecomposition path to float64 round-off (1e-10 relative; the issue asks 1e-8)."""
    from lora_ranks.spectra.weighted import factor_root

    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    if case == "random":
        g, a, damping = _psd(24, 24, 1), _psd(16, 16, 2), 0.01
    elif case == "ill-conditioned":  # eigenvalues over 10 orders of ten; the damping bounds the condition
        g, a, damping = _ill_conditioned(24, 10, 3), _ill_conditioned(16, 10, 4), 1e-6
    else:  # fewer calibration tokens than dimensions: singular factors, made definite by the damping
        g, a, damping = _psd(24, 5, 5), _psd(16, 3, 6), 0.01
    fast = factor_root(g, 24, damping), factor_root(a, 16, damping)
    reference = symmetric_root(g, 24, damping), symmetric_root(a, 16, damping)
    assert [r.kind for r in fast] == ["cholesky", "cholesky"] and [r.kind for r in reference] == ["eigh", "eigh"]
    spectra = [weighted_spectrum(delta, 17, output_root=o, input_root=i, method="svdvals") for o, i in (fast, reference)]
    np.testing.assert_allclose(spectra[0].singular_values, spectra[1].singular_values, rtol=1e-10,
                               atol=1e-12 * spectra[1].singular_values[0])
    assert spectra[0].total_energy == pytest.approx(spectra[1].total_energy, rel=1e-12)
    for rank in (1, 4, 9):
        ours = weighted_truncation_factors(delta, rank, 2.0, output_root=fast[0], input_root=fast[1])
        theirs = weighted_truncation_factors(delta, rank, 2.0, output_root=reference[0], input_root=reference[1])
        product = [b.double() @ a.double() for a, b, _ in (ours, theirs)]
        torch.testing.assert_close(product[0], product[1], rtol=0, atol=1e-6 * float(product[1].abs().max()))  # float32
        assert ours[2] == pytest.approx(theirs[2], rel=1e-10)  # the weighted relative error, float64
        # balanced as before: B^T B = A A^T, diagonal
        a_t, b_t = ours[0].double(), ours[1].double()
        torch.testing.assert_close(b_t.T @ b_t, a_t @ a_t.T, rtol=1e-4, atol=1e-6 * float((a_t @ a_t.T).abs().max()))


def test_a_factor_that_is_not_positive_definite_falls_back_to_the_eigendecomposition():
    """Undamped and singular (or all zero), a factor has no Cholesky factor: the exact eigh root is used, with its
    pseudo-inverse, and the weighted spectrum is the reference's."""
    from lora_ranks.spectra.weighted import factor_root

    singular = _psd(10, 3, 7)
    root = factor_root(singular, 10, 0.0)
    assert root.kind == "eigh"
    gen = torch.Generator().manual_seed(12)
    delta = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    ours = weighted_spectrum(delta, 7, output_root=root, input_root=factor_root(None, 6, 0.0), method="svdvals")
    values, vectors = torch.linalg.eigh(singular)
    root_of_singular = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    torch.testing.assert_close(torch.from_numpy(ours.singular_values[:6]), torch.linalg.svdvals(root_of_singular @ delta),
                               rtol=1e-8, atol=1e-10)
    assert factor_root(torch.zeros(4, 4, dtype=torch.float64), 4, 0.01).kind == "eigh"  # zero mean eigenvalue: no damping


def test_length_batches_sort_records_by_length_and_cover_each_once():
    """Every record in exactly one batch, batches in non-decreasing length, and less padding than data order."""
    lengths = [9, 2, 7, 2, 30, 5, 3, 8, 1]
    examples = [{"input_ids": [0] * n} for n in lengths]
    batches = length_batches(examples, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [4, 4, 1]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert batches[0] == [8, 1, 3, 6]  # ties (the two 2s) in data order

    def padded(groups):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups)

    data_order = [list(range(s, min(s + 4, len(lengths)))) for s in range(0, len(lengths), 4)]
    assert padded(batches) < padded(data_order)


def test_progress_counts_batches_over_all_passes(tiny):
    """One pass per layer (a tiny memory budget): on_batch goes 1..total once, not 1..per-pass again each pass."""
    model, tokenizer, examples, modules = tiny
    seen = []
    layers = list(collect_curvature(model, examples, tokenizer.pad_token_id, modules,
                                    **{**KFAC, "memory_bytes": 1, "batch_size": 3},
                                    on_batch=lambda done, total: seen.append((done, total))))
    per_pass = -(-len(examples) // 3)
    assert len(layers) == 2
    assert seen == [(n, 2 * per_pass) for n in range(1, 2 * per_pass + 1)]


def test_factor_memory_left_empty_plans_the_passes_from_the_available_memory(finetuned_pair, tmp_path, monkeypatch):
    """The default factor_memory_gb (None) plans the passes from automatic_factor_memory, measured once the model is
    loaded, and records the value used; an explicit setting is used as given. Half of psutil's available memory."""
    import hashlib
    from pathlib import Path

    import psutil

    import lora_ranks.analysis.curvature as curvature_module
    from lora_ranks.analysis.curvature import collect_layer_curvature
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.kfac import automatic_factor_memory
    from lora_ranks.settings import CurvatureSettings, FinetuneSettings

    class Memory:
        available = 6 << 30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    no_cgroup = str(tmp_path / "no-cgroup")
    assert automatic_factor_memory(cgroup_root=no_cgroup) == 3 << 30
    assert automatic_factor_memory("cpu", cgroup_root=no_cgroup) == 3 << 30
    # A container's limit, which psutil does not see: cgroup v2 (limit less usage), "max" (none), and v1.
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{5 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    assert automatic_factor_memory(cgroup_root=str(v2)) == 1 << 30
    (v2 / "memory.max").write_text("max\n")
    assert automatic_factor_memory(cgroup_root=str(v2)) == 3 << 30
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{8 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{6 << 30}\n")
    assert automatic_factor_memory(cgroup_root=str(v1)) == 1 << 30

    base, finetuned, data = finetuned_pair
    modules = CheckpointPair(base, finetuned).modules()
    subset = FinetuneSettings(subset_ratio=0.5)
    common = {"spectrum": "fisher", "min_calibration_tokens": 100}
    assert CurvatureSettings().factor_memory_gb is None
    monkeypatch.setattr(curvature_module, "automatic_factor_memory", lambda device: 1)  # one byte: a layer per pass
    result = collect_layer_curvature(finetuned, data, modules, tmp_path / "auto", CurvatureSettings(**common), subset)
    assert result.passes == 2 and result.factor_memory_gb == 1 / 2**30
    for layer, path in result.paths.items():  # hashed as written: the digest of the bytes on disk
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == result.digests[layer]
    given = collect_layer_curvature(finetuned, data, modules, tmp_path / "given",
                                    CurvatureSettings(**common, factor_memory_gb=1.0), subset)
    assert given.passes == 1 and given.factor_memory_gb == 1.0


def test_curvature_preparation_flops_use_the_recorded_passes(fisher_analysis, tmp_path):
    """The comparison's preparation FLOPs count the passes the collection made (recorded in the config, whatever the
    machine's memory); a config from before they were recorded plans them at its factor memory setting."""
    import json

    from lora_ranks.config import load_rank_config
    from lora_ranks.evidence.compute import curvature_flops, lora_ranks_preparation

    config = load_rank_config(fisher_analysis["fisher"].config_path)
    record = config.analysis_metadata.curvature
    assert record.passes == 1 and record.factor_memory_gb > 0
    metrics = tmp_path / "ft.json"
    metrics.write_text(json.dumps({"tokens": 1000}))
    expected = curvature_flops(500, record.tokens, 1, "fisher", record.settings.fisher_samples)
    assert lora_ranks_preparation(config, 500, [metrics])["curvature"] == expected
    def with_record(**changes):  # the configs are frozen: a copy with its curvature record changed
        meta = config.analysis_metadata
        return config.model_copy(update={"analysis_metadata": meta.model_copy(
            update={"curvature": meta.curvature.model_copy(update=changes)})})

    assert lora_ranks_preparation(with_record(passes=3), 500, [metrics])["curvature"] == 3 * expected
    # No passes recorded, the factor memory set to a byte: one pass per layer.
    older = with_record(passes=None, settings=record.settings.model_copy(update={"factor_memory_gb": 1e-9}))
    assert lora_ranks_preparation(older, 500, [metrics])["curvature"] == 2 * expected


def test_curvature_kind_is_the_spectrum_kind_and_refuses_weight():
    from lora_ranks.kfac import curvature_kind
    from lora_ranks.spectra.kind import SpectrumKind

    assert curvature_kind("fisher") is SpectrumKind.FISHER and curvature_kind(SpectrumKind.INPUT) is SpectrumKind.INPUT
    with pytest.raises(ValueError, match="not weight"):
        curvature_kind("weight")
    with pytest.raises(ValueError):
        curvature_kind("hessian")


def test_the_calibration_check_tokenizes_once_per_plan_and_files(finetuned_pair, monkeypatch):
    """The command line's preflight and the flow's first task both check the calibration records in one process:
    tokenized once; a changed records file is checked again."""
    import os

    import lora_ranks.analysis.curvature as curvature
    from lora_ranks.analysis import AnalysisPlan
    from lora_ranks.settings import CurvatureSettings, FinetuneSettings

    base, finetuned, data = finetuned_pair
    calls = []
    real = curvature.calibration_examples
    monkeypatch.setattr(curvature, "calibration_examples", lambda *a, **k: calls.append(a) or real(*a, **k))
    settings = dict(curvature=CurvatureSettings(spectrum="fisher", min_calibration_tokens=100),
                    finetune=FinetuneSettings(subset_ratio=0.5))
    plan = AnalysisPlan(str(base), str(finetuned), str(data), **settings)
    counts = [plan.check_calibration(), AnalysisPlan(str(base), str(finetuned), str(data), **settings).check_calibration()]
    assert counts[0] == counts[1] > 0 and len(calls) == 1
    info = Path(data).stat()
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    assert plan.check_calibration() == counts[0] and len(calls) == 2
