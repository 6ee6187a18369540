"""The ``lora-ranks`` command line. Every subcommand but ``extract`` runs a Prefect flow.

    lora-ranks demo                                  # whole pipeline on a tiny offline Qwen3
    lora-ranks analyze --base DIR --finetuned DIR --out DIR [--energy 0.9 ...]
    lora-ranks finetune --model DIR --data FILE --out DIR
    lora-ranks train --model DIR --lora-config FILE --data FILE --out DIR [--quantization 4bit]
    lora-ranks extract --base DIR --finetuned DIR --config FILE --out DIR     # plain library call, no Prefect

Without PREFECT_API_URL the flows run on Prefect's ephemeral API (SQLite under PREFECT_HOME); with it,
they report to that server and show up in its UI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows._runtime import apply_defaults


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rank allocation")
    g.add_argument("--energy", type=float, default=0.9, help="energy threshold tau in (0, 1] (default 0.9)")
    g.add_argument("--min-rank", type=int, default=4, help="lower rank bound (default 4)")
    g.add_argument("--max-rank", type=int, default=128, help="upper rank bound (default 128)")
    g.add_argument("--smoothing", choices=["none", "median", "mean"], default="median",
                   help="across-depth smoothing per module type (default median)")
    g.add_argument("--smoothing-window", type=int, default=3, help="odd window in layers (default 3)")
    g.add_argument("--round-to", type=int, default=1, help="round ranks up to a multiple (default 1: off)")
    g.add_argument("--budget", type=float, default=None,
                   help="budget mode: total LoRA parameters (>1) or a fraction of base parameters (<=1)")
    g.add_argument("--alpha-policy", choices=["constant", "rslora"], default="constant",
                   help="lora_alpha rule: constant alpha=2r (default) or rsLoRA")
    g.add_argument("--target-modules", nargs="+", default=None, help="module names (default: q k v o gate up down proj)")
    g.add_argument("--include-vision", action="store_true", help="also analyze a vision tower (Qwen2.5-VL)")
    g.add_argument("--svd-method", choices=["auto", "gram", "svdvals", "randomized"], default="auto")
    g.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    g.add_argument("--save-deltas", action="store_true", help="also save the float32 deltas as safetensors (large)")
    g.add_argument("--save-vectors", action="store_true", help="also save each delta's top singular directions")


def _analysis_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(energy_threshold=args.energy, min_rank=args.min_rank, max_rank=args.max_rank,
                  smoothing=args.smoothing, smoothing_window=args.smoothing_window, round_to=args.round_to,
                  alpha_policy=args.alpha_policy, include_vision=args.include_vision, svd_method=args.svd_method,
                  device=args.device, save_deltas=args.save_deltas, save_vectors=args.save_vectors)
    if args.budget is not None:
        if args.budget <= 0:
            raise SystemExit(f"--budget must be positive, got {args.budget}")
        kwargs["budget_fraction" if args.budget <= 1 else "budget_parameters"] = \
            args.budget if args.budget <= 1 else int(args.budget)
    if args.target_modules:
        kwargs["target_modules"] = args.target_modules
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ranks", description="Per-module LoRA ranks from weight-delta spectra.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,analyze,finetune,train,extract}")

    demo = sub.add_parser("demo", help="run svd-analysis end to end on a tiny offline Qwen3 and synthetic data")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    _add_analysis_options(demo)

    analyze = sub.add_parser("analyze", help="ranks from an existing pretrained/fine-tuned pair (no fine-tuning)")
    analyze.add_argument("--base", required=True, help="pretrained model folder or hub id")
    analyze.add_argument("--finetuned", required=True, help="fine-tuned model folder or hub id")
    analyze.add_argument("--out", required=True, help="output folder")
    analyze.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (weights_only load)")
    _add_analysis_options(analyze)

    finetune = sub.add_parser("finetune", help="brief full fine-tune on a stratified subset (preliminary-finetune)")
    finetune.add_argument("--model", required=True, help="base model folder or hub id (or demo:tiny-qwen3)")
    finetune.add_argument("--data", default=None, help="JSON/JSONL dataset")
    finetune.add_argument("--out", required=True, help="output folder")
    finetune.add_argument("--subset-ratio", type=float, default=0.01)
    finetune.add_argument("--max-samples", type=int, default=1000)
    finetune.add_argument("--steps", type=int, default=100)
    finetune.add_argument("--lr", type=float, default=1e-4)
    finetune.add_argument("--batch-size", type=int, default=4)
    finetune.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                          help="adamw8bit: bitsandbytes 8-bit AdamW, ~75%% less optimizer memory")
    finetune.add_argument("--copy-base", action="store_true",
                          help="copy a local safetensors base into pretrained/ (default: reference it)")
    finetune.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project (needs wandb)")
    finetune.add_argument("--trust-remote-code", action="store_true",
                          help="run Python code shipped with the model (off by default: only known architectures load)")

    train = sub.add_parser("train", help="train a LoRA with the per-module ranks of a rank config (train-dynamic-lora)")
    train.add_argument("--model", required=True, help="base model folder or hub id")
    train.add_argument("--lora-config", required=True, help="lora_rank_config.json")
    train.add_argument("--data", required=True, help="JSON/JSONL training data")
    train.add_argument("--out", required=True, help="output folder (adapter/ and training_metrics.json)")
    train.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="quantize the base (QLoRA)")
    train.add_argument("--warm-start-from", default=None,
                       help="fine-tuned model folder: start from the truncated SVD of its delta")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--no-gradient-checkpointing", action="store_true")
    train.add_argument("--trust-remote-code", action="store_true")

    extract = sub.add_parser("extract", help="write the truncated-SVD LoRA of a full fine-tune at the configured ranks")
    extract.add_argument("--base", required=True, help="pretrained model folder")
    extract.add_argument("--finetuned", required=True, help="fine-tuned model folder")
    extract.add_argument("--config", required=True, help="lora_rank_config.json")
    extract.add_argument("--out", required=True, help="adapter output folder")
    extract.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (weights_only load)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input ends with one ``lora-ranks: error: ...`` line and exit status 2."""
    args = build_parser().parse_args(argv)
    apply_defaults()
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError, DataError, RankConfigError, ... included
        print(f"lora-ranks: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("demo", "analyze"):
        from flows.svd_analysis import svd_analysis

        kwargs = _analysis_kwargs(args)
        if args.command == "analyze":
            kwargs.update(base_model=args.base, finetuned_model=args.finetuned, allow_pickle=args.allow_pickle)
        config_path = svd_analysis(output_dir=args.out, **kwargs)
        out = Path(args.out).resolve()
        print(f"\nRank config:        {config_path}")
        print(f"Plots:              {out / 'analysis_outputs' / 'svd' / 'plots'}")
        print(f"Raw data:           {out / 'analysis_outputs' / 'svd' / 'raw_data'}")
        if args.command == "demo":
            print(f"Checkpoint pair:    {out / 'saved_models' / 'preliminary_finetune'}")
        return 0
    if args.command == "extract":
        from lora_ranks.extract import extract_lora

        report = extract_lora(args.base, args.finetuned, args.config, args.out, allow_pickle=args.allow_pickle)
        print(f"Adapter:  {Path(args.out).resolve()}  ({len(report['modules'])} modules, "
              f"relative error mean {report['mean_relative_error']:.4f}, max {report['max_relative_error']:.4f})")
        return 0
    if args.command == "train":
        from flows.train_dynamic_lora import train_dynamic_lora_flow

        result = train_dynamic_lora_flow(model=args.model, rank_config=args.lora_config, data_path=args.data,
                                         output_dir=args.out, quantization=args.quantization,
                                         warm_start_from=args.warm_start_from, max_steps=args.steps, epochs=args.epochs,
                                         learning_rate=args.lr, batch_size=args.batch_size,
                                         gradient_checkpointing=not args.no_gradient_checkpointing,
                                         trust_remote_code=args.trust_remote_code)
        print(f"\nAdapter:  {result.adapter_dir}\nMetrics:  {result.metrics_path}\n"
              f"Trainable parameters: {result.trainable_parameters:,} ({100 * result.trainable_share:.3f}%)")
        return 0
    from flows.preliminary_finetune import preliminary_finetune

    result = preliminary_finetune(model=args.model, data_path=args.data, output_dir=args.out,
                                  subset_ratio=args.subset_ratio, max_samples=args.max_samples, max_steps=args.steps,
                                  learning_rate=args.lr, batch_size=args.batch_size,
                                  trust_remote_code=args.trust_remote_code, optimizer=args.optimizer,
                                  copy_base=args.copy_base, wandb_project=args.wandb_project)
    print(f"\nPretrained: {result.pretrained_dir}\nFine-tuned: {result.finetuned_dir}\nMetrics:    {result.metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
