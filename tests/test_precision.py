"""Training precision: bf16 autocast where the hardware has bf16 units (a CPU with avx512_bf16 / amx_bf16, a CUDA GPU
of compute capability 8.0+), float32 elsewhere; a bf16 the hardware lacks is refused before any work; a bf16 run's
losses stay close to float32's, with float32 master weights (full fine-tune) and float32 adapters over a bf16 base
(LoRA).

The suite runs with the CPU's bf16 units hidden (conftest: ``LORA_RANKS_CPU_BF16=0``), so that every other test
trains in float32 on any CI machine. The tests here that train in bf16 pretend the units are there
(``pretend_cpu_bf16``): on a CPU without them torch emulates bf16 (slower), with the same bf16 rounding of every
product's inputs, which is what the loss tolerances below bound.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_ranks.devices as devices
from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.devices import HIDE_CPU_BF16, PrecisionError, bf16_units, cpu_bf16_units, resolve_precision
from lora_ranks.extract import extract_lora
from lora_ranks.finetune import run_preliminary_finetune
from lora_ranks.settings import AllocationSettings, FinetuneSettings, LoRATrainingSettings
from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

#: Largest relative difference accepted between a bf16 and a float32 run's loss at the same step, from the same
#: weights and batches. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per input); over the few steps
#: run here the tiny model's losses moved by about 1e-4 relative (measured); 1e-2 leaves a wide margin and still
#: fails on a wrong cast (e.g. float32 master weights rounded to bf16 each step, or a LoRA stored in bf16).
LOSS_RTOL = 1e-2


@pytest.fixture
def pretend_cpu_bf16(monkeypatch):
    """The CPU shows avx512_bf16, and nothing hides it."""
    monkeypatch.delenv(HIDE_CPU_BF16, raising=False)
    monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda: "avx512_bf16")


@pytest.fixture
def no_cpu_bf16(monkeypatch):
    """The CPU shows no bf16 units (and nothing hides any)."""
    monkeypatch.delenv(HIDE_CPU_BF16, raising=False)
    monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda: None)


@pytest.mark.parametrize("units,precision,expected", [
    ("avx512_bf16", "auto", True),
    ("amx_bf16", "auto", True),
    (None, "auto", False),
    ("avx512_bf16", "bf16", True),
    (None, "bf16", PrecisionError),
    ("avx512_bf16", "float32", False),
    (None, "float32", False),
])
def test_precision_resolves_by_the_cpus_bf16_units(monkeypatch, units, precision, expected):
    monkeypatch.delenv(HIDE_CPU_BF16, raising=False)
    monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda: units)
    if expected is PrecisionError:
        with pytest.raises(PrecisionError, match="^precision bf16 is not available here: training runs on the CPU, "
                                                 "which has no bf16 units"):
            resolve_precision(precision, "cpu")
    else:
        assert resolve_precision(precision, torch.device("cpu")) is expected
    assert bf16_units("cpu") == (f"CPU {units}" if units else None)


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni", "avx512_bf16"),  # AMD Zen 4, Intel Cooper Lake
    ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "avx512_bf16, amx_bf16"),  # Intel Sapphire Rapids
    ("fpu sse avx2 fma avx512f avx512bw avx512_vnni", None),  # AVX-512 without bf16 (Skylake, Ice Lake)
    ("fpu sse sse2 avx avx2 fma sha_ni vaes", None),  # AVX2 only (AMD Zen 3)
])
def test_the_cpuinfo_flags_that_count_as_bf16_units(flags, expected):
    cpuinfo = f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16_fake\n\nprocessor\t: 1\n"
    assert devices._bf16_flags(cpuinfo) == expected
    assert devices._bf16_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") is None  # ARM: not counted (unmeasured)


def test_hidden_units_give_float32_and_the_refusal_says_why(monkeypatch):
    monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda: "amx_bf16")
    monkeypatch.setenv(HIDE_CPU_BF16, "0")
    assert cpu_bf16_units() is None and resolve_precision("auto", "cpu") is False
    with pytest.raises(PrecisionError, match=r"--lora-precision bf16 .* \(amx_bf16\) are hidden by LORA_RANKS_CPU_BF16=0; "
                                             r"use --lora-precision auto"):
        resolve_precision("bf16", "cpu", flag="--lora-precision")
    monkeypatch.setenv(HIDE_CPU_BF16, "1")  # only "0" hides
    assert resolve_precision("bf16", "cpu") is True


def test_an_unknown_precision_is_refused_by_the_settings():
    with pytest.raises(ValueError, match="precision"):
        LoRATrainingSettings(precision="fp16")
    assert LoRATrainingSettings().precision == FinetuneSettings().precision == "auto"


def test_a_forced_bf16_is_refused_before_anything_loads(no_cpu_bf16, tmp_path):
    """The model does not exist: the precision is what is reported, so nothing was loaded first."""
    from lora_ranks.check import CheckSettings, check_inputs
    from lora_ranks.train import prepare_lora_run

    data = write_synthetic_dataset(tmp_path / "d.jsonl", 2)
    with pytest.raises(PrecisionError):
        run_preliminary_finetune(tmp_path / "missing", data, tmp_path / "out", FinetuneSettings(precision="bf16"),
                                 device="cpu", progress=False)
    with pytest.raises(PrecisionError):
        prepare_lora_run(tmp_path / "missing", tmp_path / "missing.json", data, LoRATrainingSettings(precision="bf16"),
                         device="cpu")
    with pytest.raises(PrecisionError):
        check_inputs(str(tmp_path / "missing"), str(tmp_path / "missing.json"), CheckSettings(device="cpu"),
                     LoRATrainingSettings(precision="bf16"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3 base, records, a brief fine-tune of it (float32), its rank config and extracted adapter."""
    root = tmp_path_factory.mktemp("precision")
    base = build_tiny_qwen3(root / "base")
    data = write_synthetic_dataset(root / "data.jsonl", 16)
    pair = run_preliminary_finetune(base, data, root / "ft", FinetuneSettings(subset_ratio=1.0, max_steps=4,
                                                                                learning_rate=1e-2, precision="float32"),
                                    device="cpu", progress=False)
    analyze_checkpoints(base, pair.finetuned_dir, root / "an",
                        settings=AllocationSettings(min_rank=2, max_rank=8, smoothing="none"))
    config = root / "an" / "configs" / "lora_rank_config.json"
    extract_lora(base, pair.finetuned_dir, config, root / "adapter")
    return base, data, pair.finetuned_dir, config, root / "adapter"


def test_full_finetune_under_bf16_autocasts_products_keeps_float32_weights_and_losses_close(pretend_cpu_bf16, tiny,
                                                                                             tmp_path, monkeypatch):
    base, data = tiny[:2]
    seen: list[torch.dtype] = []
    linear_forward = torch.nn.Linear.forward

    def recording(self, x):  # the dtype every linear layer computes in
        out = linear_forward(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    runs = {}
    for precision in ("float32", "bf16"):
        seen.clear()
        settings = FinetuneSettings(subset_ratio=1.0, max_steps=3, learning_rate=1e-3, precision=precision)
        runs[precision] = run_preliminary_finetune(base, data, tmp_path / precision, settings, device="cpu",
                                                   progress=False)
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    bf16, f32 = runs["bf16"], runs["float32"]
    assert bf16.bf16 and not f32.bf16
    assert bf16.losses == pytest.approx(f32.losses, rel=LOSS_RTOL)
    assert bf16.losses != f32.losses  # bf16 did round something: the tolerance is what passes
    metrics = json.loads(open(bf16.metrics_path).read())
    assert metrics["bf16"] is True and metrics["bf16_units"] == "CPU avx512_bf16"
    assert json.loads(open(f32.metrics_path).read())["bf16_units"] is None
    weights = load_file(f"{bf16.finetuned_dir}/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # master weights: float32, saved as such
    original = load_file(f"{base}/model.safetensors")
    moved = [n for n, t in weights.items() if n in original and not torch.equal(t, original[n])]
    assert any("q_proj" in n for n in moved)
    # Never rounded through bf16 on the way (a bf16 round trip leaves every value a bf16 number):
    assert all((weights[n] != weights[n].bfloat16().float()).any() for n in moved)


def test_lora_under_bf16_stores_the_base_in_bf16_and_trains_float32_adapters(pretend_cpu_bf16, tiny, tmp_path):
    from lora_ranks.finetune import train_loop
    from lora_ranks.train import TrainLayout, prepare_lora_run, save_lora_run

    base, data, _, config = tiny[:4]
    losses, adapters = {}, {}
    for precision in ("float32", "bf16"):
        settings = LoRATrainingSettings(max_steps=3, batch_size=4, learning_rate=1e-3, init="cold", precision=precision)
        run = prepare_lora_run(base, config, data, settings, device="cpu")
        lora = {n: p for n, p in run.model.named_parameters() if "lora_" in n}
        frozen = {n: p for n, p in run.model.named_parameters() if "lora_" not in n}
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        assert all(p.dtype == dtype and not p.requires_grad for p in frozen.values())
        losses[precision], used = train_loop(run.model, run.examples, run.tokenizer.pad_token_id, settings, run.device,
                                             progress=False)
        assert used is (precision == "bf16") and run.bf16 is used
        result = save_lora_run(run, TrainLayout(tmp_path / precision), base, config, data, settings, losses[precision],
                               used, None, 0.0)
        metrics = json.loads(open(result.metrics_path).read())
        assert metrics["base_dtype"] == str(dtype).removeprefix("torch.") and metrics["bf16"] is used
        adapters[precision] = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    assert losses["bf16"] == pytest.approx(losses["float32"], rel=LOSS_RTOL)
    assert losses["bf16"] != losses["float32"]
    assert {t.dtype for t in adapters["bf16"].values()} == {torch.float32}
    assert adapters["bf16"].keys() == adapters["float32"].keys()


def test_a_warm_start_over_a_bf16_base_keeps_its_float32_weights_exactly(pretend_cpu_bf16, tiny):
    """The extracted adapter is not rounded to bf16 on the way in (PEFT's ``autocast_adapter_dtype``)."""
    from lora_ranks.train import prepare_lora_run

    base, data, _, config, adapter = tiny
    saved = load_file(f"{adapter}/adapter_model.safetensors")
    run = prepare_lora_run(base, config, data, LoRATrainingSettings(precision="bf16"), init_from=adapter, device="cpu")
    loaded = {n.replace(".default", ""): p for n, p in run.model.named_parameters() if "lora_" in n}
    assert run.bf16 and len(loaded) == len(saved)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(loaded[name].detach(), tensor), name
    assert next(p for n, p in run.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16


def test_cached_split_half_finetunes_are_not_reused_across_bf16_units(monkeypatch, tmp_path):
    """precision auto resolves by the hardware: the cache key of the split-half fine-tunes includes the units."""
    from lora_ranks.analysis import AnalysisPlan
    from lora_ranks.settings import AnalysisSettings
    from tasks.finetune import split_half_cache_key

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = write_synthetic_dataset(tmp_path / "d.jsonl", 2)
    plan = AnalysisPlan(str(tmp_path / "model"), data_path=str(data), finetune=FinetuneSettings(),
                        analysis=AnalysisSettings(device="cpu"))
    parameters = {"plan": plan, "out_dir": str(tmp_path / "out")}
    monkeypatch.delenv(HIDE_CPU_BF16, raising=False)
    keys = []
    for units in (None, "avx512_bf16", None):
        monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda units=units: units)
        keys.append(split_half_cache_key(None, parameters))
    assert keys[0] == keys[2] != keys[1]


def test_committed_rows_are_keyed_by_the_precision_they_run_in(monkeypatch, tiny):
    """A committed comparison row (and its preparation's digest) is not reused across bf16 units: "auto" is keyed as
    it runs. float32, asked for or reached by "auto", keeps the key that results committed before had."""
    from lora_ranks.devices import precision_key
    from lora_ranks.evidence.comparison import design_digest
    from lora_ranks.evidence.runs import RowEvaluation, RowSpec, committed_key

    base, data = tiny[0], tiny[1]
    spec, evaluation = RowSpec("r2-uniform", "warm", 0, "unused.json"), RowEvaluation(str(data), 2, 32)
    monkeypatch.delenv(HIDE_CPU_BF16, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the rows' device is the CPU, here and on a GPU
    keys = {}
    for units in (None, "avx512_bf16"):
        monkeypatch.setattr(devices, "_detected_cpu_bf16_units", lambda units=units: units)
        for precision in ("auto", "float32"):
            keys[units, precision] = (
                committed_key(base, spec, str(data), LoRATrainingSettings(precision=precision), evaluation, "d"),
                design_digest(None, FinetuneSettings(precision=precision)))
        assert precision_key({"precision": "float32"}, "cpu") == {"precision": "auto"}
    assert keys[None, "auto"] == keys[None, "float32"] == keys["avx512_bf16", "float32"]
    assert keys["avx512_bf16", "auto"][0] != keys[None, "auto"][0]
    assert keys["avx512_bf16", "auto"][1] != keys[None, "auto"][1]


def test_a_comparison_row_under_bf16_keeps_its_base_in_float32(pretend_cpu_bf16, tiny, tmp_path):
    """``compare`` evaluates each row in process: its base stays float32 (autocast only), as the peers', so that every
    row is evaluated in float32 (a base stored in bf16 evaluates higher; BENCHMARKS.md)."""
    from lora_ranks.evidence.runs import RowEvaluation, RowSpec, train_row

    base, data, _, config = tiny[:4]
    lines = open(data).read().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:6]) + "\n")
    settings = LoRATrainingSettings(max_steps=2, batch_size=4, learning_rate=1e-3, precision="bf16",
                                    gradient_checkpointing=False)
    result = train_row(str(base), RowSpec("r-uniform", "cold", 0, str(config)), str(data), tmp_path / "row", settings,
                       RowEvaluation(str(tmp_path / "eval.jsonl"), eval_samples=6, max_length=48))
    metrics = json.loads((tmp_path / "row" / "training_metrics.json").read_text())
    assert metrics["bf16"] is True and metrics["base_dtype"] == "float32"
    assert result.loss > 0


@pytest.mark.parametrize("native,precision,expected", [(True, "auto", True), (False, "auto", False),
                                                       (True, "bf16", True), (False, "bf16", PrecisionError),
                                                       (True, "float32", False)])
def test_precision_on_cuda_follows_native_bf16_support(monkeypatch, native, precision, expected):
    """A CUDA device of compute capability 8.0+ (torch's check without emulation); no GPU needed (torch.cuda mocked)."""
    import contextlib

    asked = {}

    def supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    if expected is PrecisionError:
        with pytest.raises(PrecisionError, match="CUDA device cuda:0 has no bf16 units"):
            resolve_precision(precision, "cuda:0")
    else:
        assert resolve_precision(precision, "cuda:0") is expected
    if precision != "float32":
        assert asked == {"including_emulation": False}  # emulated bf16 (pre-Ampere) does not count
