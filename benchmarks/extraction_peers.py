"""Extraction peers (issue 29, item 6): compress a full fine-tune into an adapter of a given size, three ways.

* **mergekit-extract-lora** (mergekit 0.1.5, run as its own command): the same rank r for every module, the plain
  truncated SVD of each delta.
* **PEFT ``convert_to_lora``** with an energy threshold (a float ``rank``): each module keeps the fewest singular
  directions that hold that share of its delta's energy. It converts a PEFT model, so the fine-tune is first
  written as an exact full-rank LoRA (B = U S, A = Vᵀ, scale 1) whose ``get_delta_weight`` is the delta; the
  threshold is bisected to the largest that fits the size.
* **lora-ranks' extraction** (``lora-ranks extract``): the Fisher water-filling allocation of the size (the
  comparison's ``r<r>-budget-fisher`` config) with the loss-aware truncation its analysis chose.

Size = the LoRA parameters of uniform rank r on the analyzed projections (q, k, v, o, gate, up, down). Fidelity:
mean KL(fine-tuned || base + merged adapter) per response token on the 200 held-out records, the ceiling being
full-rank deltas on the same modules; excess = KL − ceiling; and held-out loss. Inputs: the experiment's pair and
the analysis of ``experiment_peers.py --regime short`` (its configs at budget ranks 2 and 8).

    PYTHONPATH=outputs/mergekit-site .venv/bin/python benchmarks/extraction_peers.py [--record]

mergekit is not a dependency: install it beside the project, ``.venv/bin/pip install --no-deps --target
outputs/mergekit-site mergekit==0.1.5 immutables`` (its other imports are already installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def merged(base_dir: str, adapter_dir: str | Path):
    import torch
    from peft import PeftModel

    from lora_ranks.loading import load_model

    base, _ = load_model(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def mergekit_adapter(base_dir: str, ft_dir: str, rank: int, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(
        REPO / "outputs" / "mergekit-site")]))}
    command = [sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", ft_dir, "--base-model", base_dir,
               "--out-path", str(out), "--max-rank", str(rank), "--include-regex",
               rf".*\.({'|'.join(PROJECTIONS)})$", "--exclude-regex", r".*(embed_tokens|lm_head)$",
               "--skip-undecomposable", "--no-embed-lora"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mergekit-extract-lora failed: {done.stderr[-2000:]}")
    return out


def convert_to_lora_adapter(base_dir: str, pair, modules, budget: int, out: Path) -> tuple[Path, float]:
    """PEFT's convert_to_lora with the largest energy threshold whose adapter fits ``budget`` parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora
    from safetensors.torch import save_file

    from lora_ranks.loading import load_model

    base, _ = load_model(base_dir, dtype=torch.float32)
    full = {m.name: min(m.shape) for m in modules}
    model = get_peft_model(base, LoraConfig(r=max(full.values()), lora_alpha=max(full.values()),
                                            target_modules=[m.name for m in modules],
                                            rank_pattern={f"^{k}$": v for k, v in full.items()},
                                            alpha_pattern={f"^{k}$": v for k, v in full.items()}))
    with torch.no_grad():  # the exact delta as a full-rank LoRA: B A = U S Vᵀ, scale 1
        layers = dict(model.base_model.model.named_modules())
        for m in modules:
            u, s, vh = torch.linalg.svd(pair.delta(m, torch.float64), full_matrices=False)
            layer = layers[m.name]
            layer.lora_B["default"].weight.copy_((u * s).float())
            layer.lora_A["default"].weight.copy_(vh.float())
            assert layer.scaling["default"] == 1.0

    def convert(tau: float):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "converting a LoRA adapter to LoRA": intended here
            config, state = convert_to_lora(model, rank=tau)
        params = sum(v.numel() for v in state.values())
        return config, state, params

    low, high = 1e-4, 1.0
    best = convert(low)
    if best[2] > budget:
        raise SystemExit(f"even tau {low} exceeds the budget {budget}")
    for _ in range(14):
        mid = (low + high) / 2
        candidate = convert(mid)
        if candidate[2] <= budget:
            low, best = mid, candidate
        else:
            high = mid
    config, state, _ = best
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    return out, low


def table_rows(rows: list[dict], budgets: list[int], extra=lambda row: "") -> list[str]:
    """The table's lines, a size after the other: size, method (with its threshold), parameters, KL, excess,
    lora-ranks' excess over this method's, held-out loss, then ``extra(row)`` (further columns, each ending "|")."""
    lines = []
    for r in budgets:
        group = [x for x in rows if x["budget_rank"] == r]
        ours = next(x for x in group if x["method"].startswith("lora-ranks"))
        for x in group:
            ratio = "—" if x is ours else f"{ours['excess'] / x['excess']:.2f}"
            tau = f" (τ = {x['tau']:.3f})" if x["tau"] is not None else ""
            lines.append(f"| {r} | {x['method']}{tau} | {x['parameters']:,} | {x['kl']:.4f} | {x['excess']:.4f} | "
                         f"{ratio} | {x['loss']:.4f} |{extra(x)}")
    return lines


def adapter_parameters(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        return sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1] for k in handle.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import torch

    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import load_rank_config
    from lora_ranks.evidence import DeltaBasis, fidelity_to, reference_outputs
    from lora_ranks.evidence.comparison import eval_examples
    from lora_ranks.evidence.experiment import parameters_of, uniform_ranks
    from lora_ranks.extract import extract_lora
    from lora_ranks.loading import load_model

    out = Path(args.out).resolve()
    compare = out / "peers-short"
    analysis = load_rank_config(compare / "analysis" / "configs" / "lora_rank_config.json")
    base_dir, ft_dir = analysis.checkpoints.pretrained.path, analysis.checkpoints.finetuned.path
    modules = analysis.module_refs()
    pair = CheckpointPair(base_dir, ft_dir)
    finetuned, tokenizer = load_model(ft_dir, dtype=torch.float32)
    reference = reference_outputs(finetuned, eval_examples(out / "data" / "eval.jsonl", tokenizer, 200, 256),
                                  tokenizer.pad_token_id)
    base, _ = load_model(base_dir, dtype=torch.float32)
    ceiling = fidelity_to(reference, DeltaBasis(pair, modules).apply(base, {m.name: min(m.shape) for m in modules}))[0]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for r in args.budgets:
            budget = parameters_of(modules, uniform_ranks(modules, r))
            adapters = {"mergekit-extract-lora (uniform r)": (mergekit_adapter(base_dir, ft_dir, r, scratch / f"mk{r}"), None)}
            path, tau = convert_to_lora_adapter(base_dir, pair, modules, budget, scratch / f"peft{r}")
            adapters["PEFT convert_to_lora (energy threshold)"] = (path, tau)
            config = compare / "configs" / f"r{r}-budget-fisher.json"
            extract_lora(base_dir, ft_dir, config, scratch / f"lr{r}")
            adapters["lora-ranks extract (Fisher budget, its truncation)"] = (scratch / f"lr{r}", None)
            for method, (adapter, setting) in adapters.items():
                kl, loss, loss_ft = fidelity_to(reference, merged(base_dir, adapter))
                rows.append({"budget_rank": r, "budget": budget, "method": method, "tau": setting,
                             "parameters": adapter_parameters(adapter), "kl": kl, "excess": kl - ceiling,
                             "loss": loss, "loss_finetuned": loss_ft})
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"### Extraction peers: a full fine-tune compressed to a given size ({date.today().isoformat()}, CPU: "
             f"{machine})", "",
             "`PYTHONPATH=outputs/mergekit-site .venv/bin/python benchmarks/extraction_peers.py`: the experiment's "
             "analysis pair (60 full fine-tuning steps of the 6.5M-parameter Qwen3), adapters on the 42 projections; "
             f"KL(fine-tuned || base + merged adapter) on 200 held-out records, nats/token; ceiling (full-rank "
             f"deltas) {ceiling:.4f}; excess = KL − ceiling; loss of the fine-tuned model "
             f"{rows[0]['loss_finetuned']:.4f}. Raw: `benchmarks/results/extraction_peers.json`.", "",
             "| size (uniform r) | method | parameters | KL | excess | lora-ranks' excess / this one's | held-out loss |",
             "|---|---|---|---|---|---|---|"]
    lines += table_rows(rows, args.budgets)
    (REPO / "benchmarks" / "results" / "extraction_peers.json").write_text(
        json.dumps({"ceiling_kl": ceiling, "rows": rows}, indent=1) + "\n")
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
