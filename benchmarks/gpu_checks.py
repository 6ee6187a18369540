"""The GPU checks of issues 3, 4, 17 and 25, as one prepared script (run where a CUDA device is lent).

spectra   Qwen2.5-7B-shaped deltas (28 layers x q/k/v/o 3584-wide, gate/up/down 18944x3584): total seconds of
          ``compute_spectrum`` (auto method) for the whole model, against full float32 ``torch.linalg.svd`` timed
          on the first ``--naive-layers`` layers and scaled to 28; accuracy of the top-129 values against float64
          ``svdvals`` on a sample. Two delta families: Gaussian (flat spectrum, the worst case) and low rank
          plus a noise floor. Target (issue 3): <= 5 s for the whole model at 1e-4 accuracy (naive: 113 s).
finetune  peak memory and step time of one full fine-tuning step (batch 2 x 512, gradient checkpointing,
          bf16 weights) of a Qwen2.5-7B-shaped model with torch AdamW vs bitsandbytes 8-bit AdamW.
          Target (issue 4): <= 40 GB with 8-bit AdamW (torch AdamW measured 63 GB).

check     ``lora-ranks check`` on CUDA (issue 17): a Qwen2.5-7B-wide model of --check-layers layers (8: ~2.2B
          parameters with the embeddings), the original design's example ranks, batch 4 x 1024: the allocator's
          peaks with and without gradient checkpointing, latency of unmerged and merged adapter over the base.

fisher    the Fisher analysis' numerics on the device at Qwen2.5-7B shapes (issue 25): for one layer with factors
          from 4000 random token rows, the seconds of forming the factors (formed vs projected for the three
          18944-wide ones), of the curvature roots, and of the weighted spectra (dense for q/k/v/o, projected for
          gate/up/down), with the largest relative error of the top-129 values against the CPU float64 path.

    python benchmarks/gpu_checks.py --out $OUT spectra finetune check fisher
    python benchmarks/gpu_checks.py --device cpu --small --out /tmp/gpu-check spectra finetune check fisher  # smoke

Results go to <out>/gpu_checks.json and are printed as markdown tables for BENCHMARKS.md. PEFT latency and
throughput on the GPU: benchmarks/bench_peft.py --device cuda --hidden 3584 --intermediate 18944 --layers 28 --compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FULL = dict(hidden=3584, intermediate=18944, kv=512, layers=28, heads=28, kv_heads=4, vocab=152064)
SMALL = dict(hidden=256, intermediate=704, kv=64, layers=2, heads=4, kv_heads=1, vocab=1024)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _shapes(dims):
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down, (d_out, d_in)


def _delta(shape, family, device, gen):
    m, n = shape
    if family == "gaussian":
        return torch.randn(m, n, device=device, generator=gen) * 1e-3
    r = 256
    left = torch.randn(m, r, device=device, generator=gen) * (0.97 ** torch.arange(r, device=device))
    right = torch.randn(r, n, device=device, generator=gen)
    return (left @ right) * 1e-4 + torch.randn(m, n, device=device, generator=gen) * 1e-4


def check_spectra(device, dims, naive_layers: int) -> dict:
    from lora_ranks.spectra import compute_spectrum

    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for family in ("gaussian", "lowrank+noise"):
        engine_s, naive_s, errors, methods = 0.0, 0.0, [], {}
        for layer in range(dims["layers"]):
            for shape in _shapes(dims):
                delta = _delta(shape, family, device, gen)
                _sync(device)
                start = time.perf_counter()
                spectrum = compute_spectrum(delta, 129, device=device)
                _sync(device)
                engine_s += time.perf_counter() - start
                methods[spectrum.method] = methods.get(spectrum.method, 0) + 1
                if layer < naive_layers:
                    start = time.perf_counter()
                    torch.linalg.svd(delta, full_matrices=False)
                    _sync(device)
                    naive_s += time.perf_counter() - start
                if layer == 0:
                    ref = torch.linalg.svdvals(delta.double())[:129].cpu().numpy()
                    k = min(len(ref), len(spectrum.singular_values))
                    errors.append(float(max(abs(spectrum.singular_values[:k] - ref[:k]) / ref[:k])))
        out[family] = {"engine_seconds": engine_s, "naive_seconds_scaled": naive_s * dims["layers"] / max(1, naive_layers),
                       "max_rel_error_layer0": max(errors), "methods": methods,
                       "per_method_layer0_seconds": _per_method(family, device, dims, gen)}
    return out


def _per_method(family, device, dims, gen) -> dict:
    """Seconds for one layer's 7 deltas with each method forced: the data to choose ``auto``'s rule on this
    device (on the CPU, 2 cores, the Gram won at every shape; the CUDA rule is still a guess)."""
    from lora_ranks.spectra import compute_spectrum

    deltas = [_delta(shape, family, device, gen) for shape in _shapes(dims)]
    seconds = {}
    for method in ("gram", "randomized", "svdvals"):
        compute_spectrum(deltas[0], 129, method=method, device=device)  # warm-up (kernels, workspaces)
        _sync(device)
        start = time.perf_counter()
        for delta in deltas:
            compute_spectrum(delta, 129, method=method, device=device)
        _sync(device)
        seconds[method] = time.perf_counter() - start
    return seconds


def check_finetune(device, dims) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                         num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                         num_key_value_heads=dims["kv_heads"], tie_word_embeddings=False)
    out = {}
    for optimizer_name in ("adamw", "adamw8bit"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        else:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-5)
        tokens = torch.randint(0, dims["vocab"], (2, 512 if device.type == "cuda" else 64), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(3):  # the first step allocates optimizer state
            _sync(device)
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out[optimizer_name] = {"peak_gib": peak, "step_seconds": min(times[1:]), "loss": float(loss)}
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def check_config(device, dims, layers: int, out: Path) -> dict:
    """``lora-ranks check`` (issue 17) on the device: a Qwen2.5-7B-wide model of ``layers`` layers with the original
    design's example ranks (attention 32, MLP 64), batch 4 x 1024 tokens (x 64 with --small), budgets that hold;
    the report's rows and its CUDA peaks (allocated, reserved, of the device's total)."""
    import json as _json

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.bench_peft import design_example_config
    from lora_ranks.check import check_rank_config, format_table
    from lora_ranks.config import save_rank_config
    from lora_ranks.settings import CheckSettings
    from lora_ranks.synthetic import synthetic_records, train_tokenizer

    folder = out / "check-model"
    config = Qwen2Config(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                         tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.device(device):
        Qwen2ForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(folder)
    train_tokenizer([_json.dumps(r) for r in synthetic_records(50)]).save_pretrained(folder)
    save_rank_config(out / "check-ranks.json", design_example_config(folder))
    seq = 64 if dims is SMALL else 1024
    report = check_rank_config(str(folder), str(out / "check-ranks.json"),
                               CheckSettings(batch=4, seq_len=seq, device=str(device), max_train_memory_gb=130,
                                             max_infer_overhead=1.0), output_dir=str(out / "check"))
    print(format_table(report))
    return {"rows": report["rows"], "ok": report["ok"], "training_step": report["training_step"],
            "inference": report["inference"]}


def check_fisher(device, dims, tokens: int = 4000, limit: int = 8192) -> dict:
    """One 7B-shaped layer's Fisher numerics on ``device`` against the CPU float64 path (see the docstring)."""
    from lora_ranks.spectra.projected import ProjectedCurvature, module_weighted_spectrum
    from lora_ranks.spectra.weighted import factor_root

    gen = torch.Generator(device=device).manual_seed(0)
    names = ("q", "k", "v", "o", "gate", "up", "down")
    seconds = {"form_formed": 0.0, "form_projected": 0.0, "roots": 0.0, "spectra": 0.0}
    errors, methods = {}, {}
    for name, shape in zip(names, _shapes(dims)):
        d_out, d_in = shape
        delta = _delta(shape, "lowrank+noise", device, gen)  # (d_out, d_in) float32
        x = torch.randn(tokens, d_in, device=device, generator=gen)  # token inputs
        g = torch.randn(tokens, d_out, device=device, generator=gen) * 1e-2  # token gradients
        _sync(device)
        start = time.perf_counter()
        a = (x.T @ x).double() / tokens if d_in <= limit else None
        gg = (g.T @ g).double() / tokens if d_out <= limit else None
        _sync(device)
        seconds["form_formed" if max(shape) <= limit else "form_projected"] += time.perf_counter() - start
        if max(shape) > limit:  # what the formed path would have spent on the wide factor
            start = time.perf_counter()
            wide = (g.T @ g).double() if d_out > limit else (x.T @ x).double()
            _sync(device)
            seconds["form_formed"] += time.perf_counter() - start
            del wide
            start = time.perf_counter()
            side = "input" if d_in <= d_out else "output"
            rows = (g @ delta) if side == "input" else (x @ delta.T)  # (tokens, d_s): ΔWᵀ g or ΔW x
            projected = (rows.T @ rows).double() / tokens
            trace = float((g.double() ** 2).sum() if side == "input" else (x.double() ** 2).sum()) / tokens
            _sync(device)
            seconds["form_projected"] += time.perf_counter() - start
        start = time.perf_counter()
        if max(shape) > limit:
            near = a if side == "input" else gg
            curvature = ProjectedCurvature(side, factor_root(near, near.shape[0], 0.01, device),
                                           projected, 0.01 * trace / max(shape))
        else:
            curvature = (factor_root(gg, d_out, 0.01, device), factor_root(a, d_in, 0.01, device))
        _sync(device)
        seconds["roots"] += time.perf_counter() - start
        start = time.perf_counter()
        spectrum = module_weighted_spectrum(delta, 129, curvature, device=str(device))
        _sync(device)
        seconds["spectra"] += time.perf_counter() - start
        methods[name] = spectrum.method
        if isinstance(curvature, ProjectedCurvature):
            cpu = ProjectedCurvature(side, curvature.near_root.to("cpu"), projected.cpu(), curvature.far_shift)
        else:
            cpu = tuple(root.to("cpu") for root in curvature)
        reference = module_weighted_spectrum(delta.double().cpu(), 129, cpu, method="gram", device="cpu")
        k = 129
        ref = reference.singular_values[:k]
        ours = spectrum.singular_values[:k]
        big = ref >= 1e-3 * ref[0]
        errors[name] = float(max(abs(ours[big] - ref[big]) / ref[big]))
    return {"seconds": seconds, "max_rel_error_top129": errors, "methods": methods, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checks", nargs="+", choices=["spectra", "finetune", "check", "fisher"])
    parser.add_argument("--check-layers", type=int, default=8, help="layers of the model `check` measures")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test of the script itself)")
    parser.add_argument("--naive-layers", type=int, default=2)
    parser.add_argument("--out", default="gpu-checks")
    args = parser.parse_args()
    device = torch.device(args.device)
    dims = SMALL if args.small else FULL
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "dims": dims}
    if "spectra" in args.checks:
        results["spectra"] = check_spectra(device, dims, args.naive_layers)
    if "finetune" in args.checks:
        results["finetune"] = check_finetune(device, dims)
    if "fisher" in args.checks:
        results["fisher"] = check_fisher(device, dims, *((200, 512) if args.small else (4000, 8192)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "check" in args.checks:
        results["check"] = check_config(device, dims, 2 if args.small else args.check_layers, out)
    (out / "gpu_checks.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
