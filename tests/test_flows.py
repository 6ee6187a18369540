"""Flows under a temporary Prefect API: the demo end to end, and analyze on a planted pair."""

import json
from pathlib import Path

import pytest

from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import load_rank_config
from lora_ranks.settings import AllocationSettings, ComparisonSettings, FidelitySettings, FinetuneSettings, LoRATrainingSettings

pytestmark = pytest.mark.slow


def test_svd_analysis_demo_end_to_end(prefect_harness, tmp_path):
    from flows.svd_analysis import svd_analysis

    state = svd_analysis(output_dir=str(tmp_path), finetune=FinetuneSettings(max_steps=15), return_state=True)
    config_path = state.result()
    config = load_rank_config(config_path)
    assert Path(config_path) == tmp_path / "configs" / "lora_rank_config.json"
    meta = config.analysis_metadata
    assert meta.n_modules == 4 * 7  # the demo model has 4 layers x 7 projections
    ranks = [m.final_rank for m in config.modules.values()]
    assert all(4 <= r <= 128 for r in ranks)
    assert set(config.layer_ranks) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert meta.settings.energy_threshold == 0.9
    assert len(meta.layer_fingerprints) == 4
    svd = tmp_path / "analysis_outputs" / "svd"
    for name in ("singular_values.png", "cumulative_energy.png", "rank_heatmap.png"):
        assert (svd / "plots" / name).stat().st_size > 10_000
    assert len(list((svd / "raw_data" / "layers").glob("*.safetensors"))) == 4
    summary = json.loads((svd / "raw_data" / "summary.json").read_text())
    assert [row["final_rank"] for row in summary] == ranks
    metrics = json.loads((tmp_path / "saved_models" / "preliminary_finetune" / "training_metrics.json").read_text())
    assert metrics["last_loss"] < metrics["first_loss"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) >= {"svd-analysis-summary", "rank-table", "rank-config", "svd-analysis-progress"}
    assert by_key["svd-analysis-summary"].data.count("data:image/png;base64,") == 3  # all three plots embedded
    assert by_key["svd-analysis-progress"].data == 100.0


def test_analyze_flow_equals_library(prefect_harness, planted_pair, tmp_path):
    """The fanned-out flow and the serial library call give the same ranks on the same pair."""
    from flows.svd_analysis import svd_analysis

    base, ft = planted_pair
    path = svd_analysis(base_model=str(base), finetuned_model=str(ft), output_dir=str(tmp_path / "flow"),
                        allocation=AllocationSettings(energy_threshold=0.95, min_rank=2, max_rank=32, smoothing="none"))
    flow_config = load_rank_config(path)
    lib_config = analyze_checkpoints(base, ft, tmp_path / "lib",
                                     settings=AllocationSettings(energy_threshold=0.95, min_rank=2, max_rank=32,
                                                                 smoothing="none"))
    assert flow_config.rank_pattern == lib_config.rank_pattern
    assert flow_config.checkpoints == lib_config.checkpoints
    # One AnalysisPlan behind both: the same timings recorded, every one of them measured.
    for config in (flow_config, lib_config):
        timings = config.analysis_metadata.timings
        assert None not in timings.model_dump().values() and set(timings.layer_task_seconds) == {
            "model.layers.0", "model.layers.1"}
    assert flow_config.analysis_metadata.analysis == lib_config.analysis_metadata.analysis


def test_a_missing_input_is_one_message_on_every_path(prefect_harness, planted_pair, tmp_path, capsys, monkeypatch):
    """The split-half estimate without data fails with the same exception type and message from the library, the
    flow and the command line (each runs the AnalysisPlan's checks), before anything is written."""
    from flows.cli import main
    from flows.svd_analysis import svd_analysis
    from lora_ranks.errors import CalibrationError

    base, ft = planted_pair
    allocation = AllocationSettings(noise_estimate="split-half")
    with pytest.raises(CalibrationError) as library:
        analyze_checkpoints(base, ft, tmp_path / "lib", settings=allocation)
    with pytest.raises(CalibrationError) as flow:
        svd_analysis(base_model=str(base), finetuned_model=str(ft), output_dir=str(tmp_path / "flow"),
                     allocation=allocation)
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")  # main sets it; keep it to this test
    capsys.readouterr()
    status = main(["analyze", "--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "cli"),
                   "--noise-estimate", "split-half"])
    assert str(library.value) == str(flow.value) and "split-half" in str(library.value)
    assert status == 2 and capsys.readouterr().err.strip() == f"lora-ranks: error: {library.value}"
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()
    assert not any((tmp_path / "flow").rglob("*.json"))


def test_bad_parameters_fail_before_any_work(prefect_harness, tmp_path):
    from flows.svd_analysis import svd_analysis

    with pytest.raises(Exception, match="max_rank"):  # as a UI form or `--param allocation=...` sends it
        svd_analysis(output_dir=str(tmp_path), allocation={"min_rank": 16, "max_rank": 8})
    assert not (tmp_path / "demo_inputs").exists()


def test_train_dynamic_lora_flow_with_warm_start(prefect_harness, tmp_path):
    """The whole product path: fine-tune -> ranks -> train a dynamic LoRA from the SVD warm start."""
    from flows.train_dynamic_lora import train_dynamic_lora_flow
    from lora_ranks.finetune import FinetuneSettings, run_preliminary_finetune
    from lora_ranks.model import DynamicLoRAConfig, load_peft_checkpoint, lora_ranks_of
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 30, fmt="mixed")
    ft = run_preliminary_finetune(base, data, tmp_path / "ft", FinetuneSettings(subset_ratio=0.5, max_steps=10,
                                                                                 learning_rate=2e-3), progress=False)
    analyze_checkpoints(ft.pretrained_dir, ft.finetuned_dir, tmp_path / "an",
                        settings=AllocationSettings(min_rank=2, max_rank=16, smoothing="none"))
    rank_config = tmp_path / "an" / "configs" / "lora_rank_config.json"
    result = train_dynamic_lora_flow(model=str(base), rank_config=str(rank_config), data_path=str(data),
                                     output_dir=str(tmp_path / "train"), warm_start_from=ft.finetuned_dir,
                                     training=LoRATrainingSettings(max_steps=12, epochs=10, learning_rate=5e-3,
                                                                   batch_size=8))
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["init_from"] == str(tmp_path / "train" / "warm_start_adapter")
    assert (tmp_path / "train" / "warm_start_adapter" / "extraction_report.json").is_file()
    assert sum(metrics["losses"][-3:]) < sum(metrics["losses"][:3])
    config = DynamicLoRAConfig.from_file(rank_config)
    assert metrics["trainable_parameters"] == config.rank_config.trainable_parameters
    model, _ = load_peft_checkpoint(base, result.adapter_dir)
    assert lora_ranks_of(model) == config.ranks

    # Serving: the trained adapter says which servers would mis-serve it; the export-adapter flow fixes that.
    from flows.export_adapter import export_adapter_flow
    from lora_ranks.export import read_adapter, serving_problems
    from lora_ranks.settings import ExportSettings

    assert "llama.cpp" in result.serving_problems
    assert "lora-ranks export" in (Path(result.adapter_dir) / "README.md").read_text()
    uniform = export_adapter_flow(adapter_dir=result.adapter_dir, output_dir=str(tmp_path / "uniform"))
    assert uniform.rank >= max(config.ranks.values()) and serving_problems(read_adapter(tmp_path / "uniform")) == {}
    merged = export_adapter_flow(adapter_dir=result.adapter_dir, output_dir=str(tmp_path / "merged"),
                                 export=ExportSettings(format="merged"))
    assert merged.format == "merged" and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_compare_allocations_flow(prefect_harness, tmp_path):
    from flows.compare_allocations import compare_allocations
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 16, fmt="mixed")
    results = json.loads(Path(compare_allocations(
        base_model=str(base), data_path=str(data), output_dir=str(tmp_path / "cmp"),
        allocation=AllocationSettings(min_rank=2, max_rank=16), comparison=ComparisonSettings(seeds=(0, 1)),
        training=LoRATrainingSettings(max_steps=3, learning_rate=1e-3, batch_size=4),
        finetune=FinetuneSettings(max_steps=5, learning_rate=1e-3, subset_ratio=0.3),
        fidelity=FidelitySettings(fidelity_report=True))).read_text())
    rows = {r["allocation"]: r for r in results["rows"]}
    assert set(rows) == {"uniform", "energy", "budget"}
    for row in rows.values():
        assert len(row["losses"]) == 2 and all(loss > 0 for loss in row["losses"])
        assert row["trainable_parameters"] <= rows["energy"]["trainable_parameters"]
    fidelity = json.loads((tmp_path / "cmp" / "analysis" / "analysis_outputs" / "fidelity" / "fidelity.json").read_text())
    assert {p["method"] for p in fidelity["points"]} == {"energy", "budget", "uniform"}
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 5_000
    from collections import Counter

    held_out = (tmp_path / "cmp" / "data" / "eval.jsonl").read_text().splitlines()
    trained = (tmp_path / "cmp" / "data" / "train.jsonl").read_text().splitlines()
    everything = [json.dumps(json.loads(line)) for line in Path(data).read_text().splitlines()]
    assert len(held_out) == int(0.2 * len(everything))
    assert Counter(held_out) + Counter(trained) == Counter(everything)  # a partition: nothing held out is trained on


def test_compare_trains_every_row_to_its_plateau_at_an_interior_rate_with_seeded_preparation(prefect_harness,
                                                                                               tmp_path, task_states):
    """Issue 37's harness: a preparation per seed (its own subset, fine-tune, calibration, ranks, warm start), the
    validation split carved before it, a learning rate per row chosen on two tuning seeds and extended until interior,
    early stopping on every run (its best checkpoint reported), lora-ranks at rsLoRA's scale, PEFT's LoraConfig() and
    EVA beside it, accuracy per task, compute with the preparation counted; a rerun in a fresh folder with the same
    committed results trains and prepares nothing."""
    from flows.compare_allocations import compare_allocations
    from lora_ranks.settings import CurvatureSettings
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 16, fmt="mixed")
    comparison = ComparisonSettings(seeds=(0, 1), tuning_seeds=2, budget_ranks=(2,), allocations=("budget-fisher",),
                                    alpha_variants=("rslora",), peers=("default", "eva"), learning_rates=(3e-3, 9e-3),
                                    max_rate_extensions=1, eval_interval=2, patience=1, seeded_preparation=True,
                                    curve_points=2, curve_samples=4, accuracy_samples=6, max_new_tokens=4,
                                    full_finetune=True, full_learning_rates=(3e-3, 9e-3))
    settings = dict(base_model=str(base), data_path=str(data), allocation=AllocationSettings(min_rank=1, max_rank=16),
                    curvature=CurvatureSettings(spectrum="fisher", min_calibration_tokens=50),
                    training=LoRATrainingSettings(max_steps=6, epochs=100, learning_rate=1e-3, batch_size=4),
                    finetune=FinetuneSettings(max_steps=3, learning_rate=1e-3, subset_ratio=0.3),
                    results_dir=str(tmp_path / "results"))
    results = json.loads(Path(compare_allocations(output_dir=str(tmp_path / "cmp"), comparison=comparison,
                                                  **settings)).read_text())
    rows = {(r["allocation"], r["init"]): r for r in results["rows"]}
    full = rows.pop(("full-finetune", "full"))
    assert set(rows) == {("r2-uniform", "warm"), ("r2-budget-fisher", "warm"), ("r2-budget-fisher-rslora", "warm"),
                         ("r2-uniform", "default"), ("r2-uniform", "eva")}
    assert len(full["losses"]) == 2
    # each seed prepared on its own subset of the fit records, never on the validation split
    cmp = tmp_path / "cmp"
    validation = (cmp / "data" / "validation.jsonl").read_text().splitlines()
    for seed in (0, 1):
        metrics = json.loads((cmp / "seeds" / f"seed{seed}" / "analysis" / "saved_models" / "preliminary_finetune"
                              / "training_metrics.json").read_text())
        assert metrics["settings"]["seed"] == seed and metrics["data"] == str(cmp / "data" / "fit.jsonl")
    assert validation and not set(validation) & set((cmp / "data" / "fit.jsonl").read_text().splitlines())
    rslora = load_rank_config(cmp / "seeds" / "seed0" / "configs" / "r2-budget-fisher-rslora.json")
    assert rslora.use_rslora and rslora.rank_pattern == load_rank_config(
        cmp / "seeds" / "seed0" / "configs" / "r2-budget-fisher.json").rank_pattern
    choices = results["learning_rate_choices"]
    # the full fine-tune (the ceiling) is a row like the others: its own grid, tuned on both seeds, to its plateau,
    # its best checkpoint saved whole and committed
    full_choice = choices.pop("full-finetune/full")
    assert set(full_choice["per_seed"]) >= {"0.003", "0.009"}
    for seed in (0, 1):
        committed_full = json.loads((tmp_path / "results" / f"full-finetune-seed{seed}-lr"
                                     f"{full_choice['learning_rate']:g}.json").read_text())
        assert committed_full["loss"] == full["losses"][seed] and committed_full["stopped"] in ("patience", "cap")
        assert committed_full["train_flops"] == 6 * committed_full["matmul_parameters"] * committed_full["train_tokens"]
        assert (Path(committed_full["run_dir"]) / "model" / "model.safetensors").is_file()
    for (label, init), row in rows.items():
        choice = choices[f"{label}/{init}"]
        rates = sorted(float(r) for r in choice["per_seed"])
        assert all(set(per_seed) == {"0", "1"} for per_seed in choice["per_seed"].values())  # two tuning seeds
        assert rates[:2] == [3e-3, 9e-3] or rates[0] < 3e-3 or rates[-1] > 9e-3
        # interior, or at an edge only once the extension ran out
        assert rates[0] < row["learning_rate"] < rates[-1] or (choice["at_edge"] and len(rates) == 3)
        assert row["learning_rate"] == min(rates, key=lambda r: choice["validation_losses"][f"{r:g}"] or 1e9)
        assert len(row["losses"]) == 2 and 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_by_task"]
        for run in row["runs"]:
            assert run["stopped"] in ("patience", "cap") and run["best_step"] % 2 == 0 or run["best_step"] == 6
            assert run["validation_loss"] == min(p["validation_loss"] for p in run["validation_curve"])
    prep = results["preparation"]
    assert set(prep) == {"0", "1"} and all(p["seconds"] > 0 and p["total"] > 0 for p in prep.values())
    warm = rows["r2-budget-fisher", "warm"]
    assert warm["preparation_flops"] == pytest.approx((prep["0"]["total"] + prep["1"]["total"]) / 2)
    assert warm["preparation_seconds"] == pytest.approx((prep["0"]["seconds"] + prep["1"]["seconds"]) / 2)
    assert rows["r2-uniform", "default"]["preparation_flops"] == 0.0 and rows["r2-uniform", "eva"]["preparation_flops"] > 0
    assert warm["vs_default"]["n"] == 2
    committed = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    assert "preparation-seed0.json" in committed and "r2-budget-fisher-seed1-lr0.003.json" in committed
    # each seed's preparation is committed when it is made, before its rows train (a comparison stopped midway
    # keeps it), and it is the record the report used
    for seed in (0, 1):
        record = json.loads((tmp_path / "results" / f"preparation-seed{seed}.json").read_text())
        assert record.pop("design") and record == prep[str(seed)]
        first_row = min(p.stat().st_mtime_ns for p in (tmp_path / "results").glob(f"r2-*-seed{seed}-lr*.json"))
        assert (tmp_path / "results" / f"preparation-seed{seed}.json").stat().st_mtime_ns < first_row
    # a fresh folder with the same committed rows: nothing trained, nothing prepared, the same table
    again = json.loads(Path(compare_allocations(output_dir=str(tmp_path / "again"),
                                                comparison=comparison.replace(full_finetune=False,
                                                                              full_learning_rates=()),
                                                **settings)).read_text())
    assert not (tmp_path / "again" / "seeds").exists() and not (tmp_path / "again" / "runs").exists()
    again_rows = {(r["allocation"], r["init"]): r["losses"] for r in again["rows"]}
    assert again_rows == {key: row["losses"] for key, row in rows.items()}

    # The comparison's fidelity table is cached by content: measured again only when an input changes or its file
    # is gone (a resumed comparison reads it; on SmolLM2 it took 10-20 minutes on a CPU).
    from prefect import flow

    from tasks._cache import run_cached
    from tasks.evidence import allocation_fidelity_task, fidelity_table_is_current

    seed0 = cmp / "seeds" / "seed0"
    analysis_config = seed0 / "analysis" / "configs" / "lora_rank_config.json"
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text((cmp / "data" / "eval.jsonl").read_text())

    @flow
    def fidelity_table():
        return run_cached(allocation_fidelity_task, fidelity_table_is_current, "table gone: measuring it again",
                          analysis_config_path=str(analysis_config),
                          configs={label: str(seed0 / "configs" / f"{label}.json")
                                   for label in ("r2-uniform", "r2-budget-fisher")},
                          eval_data_path=str(held_out), comparison_root=str(tmp_path / "fidelity"),
                          settings=FidelitySettings(eval_samples=4, eval_max_length=64))

    def measured():
        state = fidelity_table(return_state=True)
        return [s for name, runs in task_states(state).items() if name.startswith("allocation-fidelity")
                for s, _ in runs]

    assert measured() == ["Completed"]
    assert measured() == ["Cached"]
    written_again = json.loads(analysis_config.read_text())  # by a resumed run: other durations, the same content
    written_again["analysis_metadata"]["timings"]["analysis_seconds"] += 1.0
    analysis_config.write_text(json.dumps(written_again))
    assert measured() == ["Cached"]
    held_out.write_text("\n".join(held_out.read_text().splitlines()[1:]) + "\n")  # another held-out set
    assert measured() == ["Completed"]
    (tmp_path / "fidelity" / "allocation_fidelity.json").unlink()  # its file gone: measured again
    assert sorted(measured()) == ["Cached", "Completed"]
    assert (tmp_path / "fidelity" / "allocation_fidelity.json").is_file()


@pytest.mark.slow
def test_compare_allocations_matrix_pairs_every_row_with_uniform_ranks(prefect_harness, tmp_path):
    """Budgets as uniform-rank equivalents, water-filling on the Fisher and the weight spectra, warm and cold, and
    a full fine-tune: the report's paired differences and gap closed follow from the per-seed losses."""
    import math

    from flows.compare_allocations import compare_allocations
    from lora_ranks.evidence.experiment import paired_comparison
    from lora_ranks.settings import CurvatureSettings
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 16, fmt="mixed")
    results = json.loads(Path(compare_allocations(
        base_model=str(base), data_path=str(data), output_dir=str(tmp_path / "cmp"),
        curvature=CurvatureSettings(spectrum="fisher", min_calibration_tokens=100),
        comparison=ComparisonSettings(seeds=(0, 1), budget_ranks=(2,), cold_baseline=True, full_finetune=True,
                                      comparability=True),
        training=LoRATrainingSettings(max_steps=3, learning_rate=1e-3, batch_size=4),
        finetune=FinetuneSettings(max_steps=5, learning_rate=1e-3, subset_ratio=0.5))).read_text())
    rows = {(r["allocation"], r["init"]): r for r in results["rows"]}
    labels = {"r2-uniform", "r2-energy", "r2-budget-weight", "r2-budget-input", "r2-budget-fisher"}
    assert set(rows) == ({(label, init) for label in labels | {"signal"} for init in ("warm", "cold")}
                         | {("full-finetune", "full")})
    signal = rows.pop(("signal", "warm")), rows.pop(("signal", "cold"))
    for row in signal:  # a budget of its own, paired with the uniform ranks (the only ones here)
        assert row["budget_rank"] is None and row["vs_uniform"] == paired_comparison(row["losses"], rows[
            ("r2-uniform", "warm")]["losses"])
    fidelity = json.loads((tmp_path / "cmp" / "allocation_fidelity.json").read_text())
    assert {(r["allocation"], r["truncation"]) for r in fidelity["rows"]} == {
        (label, t) for label in labels | {"signal"} for t in ("weight", "fisher")}
    assert not (tmp_path / "cmp" / "analysis" / "analysis_outputs" / "fidelity").exists()  # no tau sweep besides
    comparability = json.loads((tmp_path / "cmp" / "sensitivity.json").read_text())["spectra"]
    assert set(comparability) == {"weight", "input", "fisher"}
    uniform = rows[("r2-uniform", "warm")]
    per_rank = uniform["trainable_parameters"] // 2
    full = rows[("full-finetune", "full")]["loss_mean"]
    cold = rows[("r2-uniform", "cold")]["loss_mean"]
    for (label, init), row in rows.items():
        if label == "full-finetune":
            continue
        assert row["trainable_parameters"] <= 2 * per_rank and row["budget_rank"] == 2
        if (label, init) != ("r2-uniform", "warm"):  # the reference itself has no paired difference
            assert row["vs_uniform"] == paired_comparison(row["losses"], uniform["losses"])
        assert math.isclose(row["gap_closed"], (cold - row["loss_mean"]) / (cold - full))
    assert uniform["vs_uniform"] is None
    assert (tmp_path / "cmp" / "runs" / "r2-budget-fisher-cold-seed1" / "adapter").is_dir()


def test_fisher_spectrum_through_the_flow_is_cached_by_content(prefect_harness, tmp_path, task_states):
    """svd-analysis with the Fisher spectrum: collect-curvature runs once, a rerun serves it and every layer from
    the cache, and the ranks are those of the library call."""
    from flows.svd_analysis import svd_analysis
    from lora_ranks.finetune import run_preliminary_finetune
    from lora_ranks.settings import CurvatureSettings
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 20, fmt="mixed")
    subset = FinetuneSettings(subset_ratio=0.5, max_steps=6, learning_rate=3e-3)
    ft = run_preliminary_finetune(base, data, tmp_path / "ft", subset, progress=False)
    curvature = CurvatureSettings(spectrum="fisher", fisher_samples=2, min_calibration_tokens=100)
    allocation = AllocationSettings(min_rank=1, max_rank=16, smoothing="none")
    kwargs = dict(base_model=ft.pretrained_dir, finetuned_model=ft.finetuned_dir, data_path=str(data),
                  output_dir=str(tmp_path / "flow"), allocation=allocation, curvature=curvature, finetune=subset,
                  return_state=True)
    first = svd_analysis(**kwargs)
    states = task_states(first)
    assert [s for s, _ in states["collect-curvature"]] == ["Completed"]
    again = task_states(svd_analysis(**kwargs))
    assert {name: [s for s, _ in v] for name, v in again.items() if name.startswith(("collect", "analyze"))} == {
        "collect-curvature": ["Cached"], "analyze-model.layers.0": ["Cached"], "analyze-model.layers.1": ["Cached"]}
    # The factor files were hashed as they were written: the digests are those of the bytes on disk. A cached result
    # whose file changed since is collected again (the layers are then served by the new file's digest: safetensors
    # writes its header's metadata in no fixed order, so the same factors may or may not hash the same).
    import torch
    from safetensors.torch import load_file

    factor_file = tmp_path / "flow" / "analysis_outputs" / "svd" / "curvature" / "model.layers.1.safetensors"
    written = {k: v.clone() for k, v in load_file(factor_file).items()}  # load_file maps the file: copy it first
    factor_file.write_bytes(factor_file.read_bytes()[:-8] + bytes(8))
    third = task_states(svd_analysis(**kwargs))
    assert sorted(s for s, _ in third["collect-curvature"]) == ["Cached", "Completed"]
    again_written = load_file(factor_file)  # the same factors, collected again
    assert again_written.keys() == written.keys() and all(torch.equal(again_written[k], written[k]) for k in written)
    flow_config = load_rank_config(first.result())
    lib_config = analyze_checkpoints(ft.pretrained_dir, ft.finetuned_dir, tmp_path / "lib", settings=allocation,
                                     curvature=curvature, calibration_data=data, subset=subset)
    assert flow_config.rank_pattern == lib_config.rank_pattern
    assert {m.spectrum for m in flow_config.modules.values()} == {"fisher"}


def test_split_half_noise_estimate_through_the_flow(prefect_harness, tmp_path, task_states):
    """svd-analysis with noise_estimate split-half: its two fine-tunes and the agreement run as tasks, and the
    signal rule keeps the split-half ranks the config records."""
    from flows.svd_analysis import svd_analysis
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    base = build_tiny_qwen3(tmp_path / "base", num_layers=2)
    data = write_synthetic_dataset(tmp_path / "data.jsonl", 20, fmt="mixed")
    state = svd_analysis(base_model=str(base), data_path=str(data), output_dir=str(tmp_path / "flow"),
                         allocation=AllocationSettings(rank_rule="signal", noise_estimate="split-half", min_rank=1,
                                                       max_rank=16, smoothing="none"),
                         finetune=FinetuneSettings(subset_ratio=0.5, max_steps=6, learning_rate=3e-3), return_state=True)
    states = task_states(state)
    assert [s for s, _ in states["split-half-finetunes"]] == ["Completed"]
    assert [s for s, _ in states["split-half-ranks"]] == ["Completed"]
    modules = load_rank_config(state.result()).modules
    assert all(m.raw_rank == m.split_half_rank for m in modules.values())
    half_b = tmp_path / "flow" / "saved_models" / "split_half" / "half-b" / "finetuned"
    assert half_b.is_dir()

    # Rerun with the same inputs: the two fine-tunes are reused (cached by their inputs), the ranks are the same.
    kwargs = dict(base_model=str(base), data_path=str(data), output_dir=str(tmp_path / "flow"),
                  allocation=AllocationSettings(rank_rule="signal", noise_estimate="split-half", min_rank=1,
                                                max_rank=16, smoothing="none"),
                  finetune=FinetuneSettings(subset_ratio=0.5, max_steps=6, learning_rate=3e-3), return_state=True)
    again = svd_analysis(**kwargs)
    assert [s for s, _ in task_states(again)["split-half-finetunes"]] == ["Cached"]
    assert {n: m.split_half_rank for n, m in load_rank_config(again.result()).modules.items()} == {
        n: m.split_half_rank for n, m in modules.items()}
    # Their folders gone, they are fine-tuned again.
    import shutil

    shutil.rmtree(half_b)
    third = svd_analysis(**kwargs)
    assert sorted(s for s, _ in task_states(third)["split-half-finetunes"]) == ["Cached", "Completed"]
    assert half_b.is_dir()
