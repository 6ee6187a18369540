"""Benchmark: `lora-ranks extract` vs the public `mergekit-extract-lora`, whole commands side by side.

Same mid-size bf16 pair (Qwen3-shaped: hidden 1024, intermediate 2816, 8 layers, planted spectra), same
uniform rank on the 7 projections of every layer. Both commands are timed end to end (start-up included) with
GNU time, which also gives peak resident memory; the reconstruction error ||dW - s B A||_F / ||dW||_F of
every module is computed here, from each tool's saved adapter, by the same code.

mergekit (PyPI `mergekit` 0.1.5) is installed by this script in its own virtual environment (default
/tmp/mergekit-venv, CPU torch first), never as a project dependency.

    .venv/bin/python benchmarks/bench_extract.py [--rank 32] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-extract-lora"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = str(venv / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)  # the CPU wheel, before mergekit pulls one
        subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)
    return exe


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a whole command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        seconds, kb = out.read().split()[-2:]
    return float(seconds), int(kb) / 1024


def reconstruction_errors(base: Path, finetuned: Path, adapter: Path) -> dict[str, float]:
    import torch
    from safetensors import safe_open

    from lora_ranks.checkpoints import CheckpointPair

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    pair = CheckpointPair(base, finetuned)
    errors = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as h:
        keys = set(h.keys())
        for m in pair.modules():
            a_key = next(k for k in keys if k.endswith(f"{m.name}.lora_A.weight"))
            lora_a = h.get_tensor(a_key).double()
            lora_b = h.get_tensor(a_key.replace("lora_A", "lora_B")).double()
            r = lora_a.shape[0]
            alpha = cfg.get("alpha_pattern", {}).get(m.name, cfg["lora_alpha"])
            for pattern, value in cfg.get("alpha_pattern", {}).items():
                if pattern.startswith("^") and pattern[1:].replace("\\", "") == m.name:
                    alpha = value
            scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
            delta = pair.delta(m).double()
            errors[m.name] = float(torch.linalg.vector_norm(delta - scale * lora_b @ lora_a) / torch.linalg.vector_norm(delta))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command, interleaved; medians reported")
    parser.add_argument("--mergekit-venv", default="/tmp/mergekit-venv")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    from lora_ranks.analysis import analyze_checkpoints
    from lora_ranks.settings import AllocationSettings
    from lora_ranks.synthetic import write_planted_pair

    mergekit = ensure_mergekit(Path(args.mergekit_venv))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, ft = write_planted_pair(tmp / "base", tmp / "ft", hidden_size=1024, intermediate_size=2816,
                                      num_layers=args.layers, num_heads=16, num_kv_heads=4, planted_rank=(16, 48, 96),
                                      decay=0.97, noise=0.3, dtype="bfloat16", vocab_size=4096)
        analyze_checkpoints(base, ft, tmp / "an", settings=AllocationSettings(
            min_rank=args.rank, max_rank=args.rank, smoothing="none"))  # uniform rank: equal to mergekit's
        config = tmp / "an" / "configs" / "lora_rank_config.json"
        ours_cmd = [str(REPO / ".venv" / "bin" / "lora-ranks"), "extract", "--base", str(base), "--finetuned", str(ft),
                    "--config", str(config), "--out", str(tmp / "ours")]
        theirs_cmd = [str(mergekit), "--model", str(ft), "--base-model", str(base), "--out-path", str(tmp / "mergekit"),
                      "--max-rank", str(args.rank), "--no-embed-lora",
                      "-i", r".*layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj.*"]
        runs = {"ours": [], "theirs": []}
        for _ in range(args.repeats):  # interleaved, so machine-load drift hits both alike
            runs["ours"].append(timed(ours_cmd))
            runs["theirs"].append(timed(theirs_cmd))
        ours_s, ours_mb = (statistics.median(x) for x in zip(*runs["ours"]))
        theirs_s, theirs_mb = (statistics.median(x) for x in zip(*runs["theirs"]))
        ours_err = reconstruction_errors(base, ft, tmp / "ours")
        theirs_err = reconstruction_errors(base, ft, tmp / "mergekit")

    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"### LoRA extraction vs mergekit ({date.today().isoformat()}, CPU: {machine})", "",
        f"bf16 Qwen3-shaped pair, hidden 1024, intermediate 2816, {args.layers} layers, rank {args.rank} on all "
        f"{len(ours_err)} projections. Command: `.venv/bin/python benchmarks/bench_extract.py`", "",
        f"Medians of {args.repeats} interleaved runs of each whole command.", "",
        "| tool | wall s (whole command) | peak RSS MB | mean rel. error | max rel. error |", "|---|---|---|---|---|",
        f"| lora-ranks extract | {ours_s:.1f} | {ours_mb:.0f} | {mean(ours_err):.6f} | {max(ours_err.values()):.6f} |",
        f"| mergekit-extract-lora 0.1.5 | {theirs_s:.1f} | {theirs_mb:.0f} | {mean(theirs_err):.6f} | "
        f"{max(theirs_err.values()):.6f} |",
        "", f"Speed-up {theirs_s / ours_s:.1f}x; peak memory {ours_mb / theirs_mb:.2f}x of mergekit's; largest per-module "
        f"error difference (ours - mergekit) {max(ours_err[n] - theirs_err[n] for n in ours_err):+.2e}.",
    ]
    emit("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
