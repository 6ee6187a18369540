"""Fidelity metrics on cases with known answers, and the allocations compared at equal parameter count."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_ranks.analysis import analyze_checkpoints, load_spectra, spectra_files
from lora_ranks.checkpoints import CheckpointPair
from lora_ranks.evidence import (
    DeltaBasis,
    allocation_configs,
    fidelity_sweep,
    held_out_loss,
    next_token_fidelity,
    uniform_allocation,
)
from lora_ranks.ranks import AllocationSettings


@pytest.fixture(scope="module")
def setting(planted_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev")
    analyze_checkpoints(*planted_pair, out)
    spectra = load_spectra(spectra_files(out / "analysis_outputs" / "svd"))
    pair = CheckpointPair(*planted_pair)
    modules = pair.modules()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (12, 16), generator=gen)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    base = AutoModelForCausalLM.from_pretrained(planted_pair[0])
    finetuned = AutoModelForCausalLM.from_pretrained(planted_pair[1])
    return pair, modules, spectra, examples, base, finetuned


def test_identical_models_have_zero_kl(setting):
    _, _, _, examples, base, _ = setting
    kl, loss_a, loss_b = next_token_fidelity(base, base, examples, pad_token_id=0)
    assert kl == 0.0 and loss_a == loss_b


def test_full_rank_reconstruction_matches_the_finetuned_model(setting):
    pair, modules, _, examples, base, finetuned = setting
    basis = DeltaBasis(pair, modules)
    full = {m.name: min(m.shape) for m in modules}
    kl, loss, loss_ft = next_token_fidelity(finetuned, basis.apply(base, full), examples, pad_token_id=0)
    kl_base, _, _ = next_token_fidelity(finetuned, base, examples, pad_token_id=0)
    assert kl_base > 1e-6  # the deltas move the model, so the check below is not vacuous
    assert kl < 1e-9 < 1e-3 * kl_base and loss == pytest.approx(loss_ft, abs=1e-6)


def test_sweep_is_monotone_in_tau_and_compares_at_equal_budgets(setting):
    pair, modules, spectra, examples, base, finetuned = setting
    points = fidelity_sweep(base, finetuned, DeltaBasis(pair, modules), spectra, examples, 0, taus=(0.5, 0.9, 0.99))
    energy = [p for p in points if p.method == "energy"]
    assert [p.trainable_parameters for p in energy] == sorted(p.trainable_parameters for p in energy)
    assert energy[0].mean_kl >= energy[-1].mean_kl
    for e in energy:
        for other in (p for p in points if p.method in ("budget", "uniform") and p.setting == e.trainable_parameters):
            assert other.trainable_parameters <= e.trainable_parameters


def test_uniform_allocation_is_the_largest_rank_that_fits(setting):
    _, modules, _, _, _, _ = setting
    per_rank = sum(m.shape[0] + m.shape[1] for m in modules)
    ranks = uniform_allocation(modules, 5 * per_rank + 10)
    assert set(ranks.values()) == {5}


def test_allocation_configs_have_equal_or_smaller_budgets(setting):
    _, modules, spectra, _, _, _ = setting
    configs = allocation_configs(modules, spectra, 10**6, AllocationSettings(energy_threshold=0.9, min_rank=1,
                                                                            max_rank=32, smoothing="none"))
    budget = configs["energy"].trainable_parameters
    assert configs["budget"].trainable_parameters <= budget
    assert configs["uniform"].trainable_parameters <= budget
    assert len(set(configs["uniform"].rank_pattern.values())) <= 2  # one rank (capped at small sides)


def test_held_out_loss_matches_the_model_loss(setting):
    _, _, _, examples, base, _ = setting
    ids = torch.tensor([examples[0]["input_ids"]])
    expected = float(base(input_ids=ids, labels=ids).loss)
    assert held_out_loss(base, examples[:1], pad_token_id=0) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("t,df,p_two_sided", [(2.776445, 4, 0.05), (2.262157, 9, 0.05), (4.604095, 4, 0.01),
                                               (1.0, 1, 0.5), (0.0, 7, 1.0)])
def test_student_t_p_values_match_the_tables(t, df, p_two_sided):
    from lora_ranks.evidence.experiment import student_t_sf

    assert 2 * student_t_sf(t, df) == pytest.approx(p_two_sided, abs=2e-6)


def test_paired_comparison_of_seeds():
    from lora_ranks.evidence.experiment import paired_comparison

    out = paired_comparison([2.0, 2.1, 1.9, 2.05, 2.0], [2.1, 2.2, 2.0, 2.1, 2.15])
    diffs = [-0.1, -0.1, -0.1, -0.05, -0.15]
    mean = sum(diffs) / 5
    std = (sum((d - mean) ** 2 for d in diffs) / 4) ** 0.5
    assert out["mean"] == pytest.approx(mean) and out["std"] == pytest.approx(std)
    assert out["t"] == pytest.approx(mean / (std / 5**0.5)) and 0 < out["p"] < 0.01


def test_energy_ranks_at_budget_fit_and_are_tight(planted_pair, tmp_path):
    from lora_ranks.evidence.experiment import allocations_at_budget, parameters_of

    analyze_checkpoints(*planted_pair, tmp_path)
    spectra = load_spectra(spectra_files(tmp_path / "analysis_outputs" / "svd"))
    modules = CheckpointPair(*planted_pair).modules()
    budget = 20_000
    allocations = allocations_at_budget(modules, {"weight": spectra}, budget, min_rank=1, max_rank=32)
    assert set(allocations) == {"uniform", "energy", "budget-weight"}
    for ranks in allocations.values():
        assert parameters_of(modules, ranks) <= budget
    assert parameters_of(modules, allocations["budget-weight"]) > 0.9 * budget
