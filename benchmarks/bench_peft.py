"""Benchmark: what a dynamic-rank LoRA costs at inference and training time (CPU, mid-size Qwen3).

Side by side in one process, on one randomly initialised Qwen3 (hidden 1024, intermediate 2816, 8 layers):

* adapter parameters and bytes, and the trainable share, predicted from the rank config vs measured;
* forward latency (eval, no grad, batch 1 x 256 tokens, median of round-robin runs): base, PEFT unmerged,
  PEFT merged (``merge_and_unload``), optionally unmerged under ``torch.compile`` (``--compile``);
* training throughput (tokens/s, AdamW step, batch 4 x 256): full fine-tuning vs LoRA.

Ranks follow the original design's example (attention 32, MLP 64).

    .venv/bin/python benchmarks/bench_peft.py [--record]
    python benchmarks/bench_peft.py --device cuda --hidden 3584 --intermediate 18944 --layers 28 --compile  # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import emit  # noqa: E402


def design_example_config(model_dir: Path):
    """A rank config with the original design's example ranks: attention 32, MLP 64."""
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import build_rank_config
    from lora_ranks.ranks import ModuleAllocation
    from lora_ranks.settings import AllocationSettings

    pair = CheckpointPair(model_dir, model_dir)
    allocations = []
    for m in pair.modules():
        r = 64 if m.module_type in ("gate_proj", "up_proj", "down_proj") else 32
        allocations.append(ModuleAllocation(name=m.name, module_type=m.module_type, layer=m.layer, depth=m.depth,
                                            shape=m.shape, raw_rank=r, saturated=False, bounded_rank=r, smoothed_rank=r,
                                            final_rank=r, energy_retained=1.0))
    return build_rank_config(allocations, AllocationSettings(), base_parameters=pair.base_parameters)


def forward_ms(models: dict, tokens, repeats: int) -> dict[str, float]:
    """Median forward latency (ms) of each model, measured round-robin so that drifting machine load hits
    every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(tokens)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                if tokens.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(tokens)
                if tokens.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def train_tokens_per_s(model, tokens, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd unmerged PEFT")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from lora_ranks.config import save_rank_config
    from lora_ranks.model import DynamicLoRAConfig, create_peft_model_from_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen3Config(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                             head_dim=args.hidden // 16, tie_word_embeddings=False)
        Qwen3ForCausalLM(config).save_pretrained(Path(tmp) / "base")
        rank_config = design_example_config(Path(tmp) / "base")
        save_rank_config(Path(tmp) / "ranks.json", rank_config)
        dyn = DynamicLoRAConfig.from_file(Path(tmp) / "ranks.json")

        infer = torch.randint(0, 4096, (1, 256), device=dev)
        train = torch.randint(0, 4096, (4, 256), device=dev)
        load = lambda: AutoModelForCausalLM.from_pretrained(Path(tmp) / "base", dtype=dtype).to(dev)  # noqa: E731
        base = load().eval()
        full_tps = train_tokens_per_s(load(), train, args.train_steps)

        peft_model = create_peft_model_from_config(load(), dyn).eval()
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)  # a trained adapter is not zero
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        lora_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
        lora_tps = train_tokens_per_s(peft_model, train, args.train_steps)
        peft_model.eval()
        merged = create_peft_model_from_config(load(), dyn)
        merged.load_state_dict(peft_model.state_dict())
        merged = merged.merge_and_unload().eval()
        models = {"base": base, "unmerged": peft_model, "merged": merged}
        if args.compile:
            models["unmerged, torch.compile"] = torch.compile(peft_model)
        latency = forward_ms(models, infer, args.repeats)

    base_ms = latency["base"]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU: {platform.machine()}, {os.cpu_count()} cores"
    machine = f"{where}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}"
    lines = [
        f"### PEFT dynamic-rank LoRA costs ({date.today().isoformat()}, {machine})", "",
        f"Qwen3 hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab 4096; ranks attention 32 / "
        "MLP 64 (the original design's example). Command: `.venv/bin/python benchmarks/bench_peft.py`", "",
        "| quantity | value |", "|---|---|",
        f"| adapter parameters (predicted from config / measured) | {rank_config.trainable_parameters:,} / {trainable:,} |",
        f"| adapter bytes (float32) | {lora_bytes / 2**20:.1f} MiB |",
        f"| trainable share (config compression_ratio) | {100 * rank_config.compression_ratio:.2f}% |",
        f"| forward 1x256, base (median of {args.repeats}, round-robin) | {base_ms:.1f} ms |",
        *[f"| forward 1x256, PEFT {name} | {ms:.1f} ms ({100 * (ms / base_ms - 1):+.1f}%) |"
          for name, ms in latency.items() if name != "base"],
        f"| training 4x256, full fine-tune | {full_tps:,.0f} tokens/s |",
        f"| training 4x256, dynamic LoRA | {lora_tps:,.0f} tokens/s ({lora_tps / full_tps:.2f}x) |",
    ]
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
