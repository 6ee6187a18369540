"""Benchmark: lora-ranks' training loop against TRL's ``SFTTrainer``, side by side in one run (issue 38, item 2).

The same work on both sides: the same tokenized records (lora-ranks' tokenization: prompt tokens masked, padding to
the longest record of a batch), batch, maximum length, AdamW (torch's), learning rate, cosine schedule with the same
warmup, gradient clipping at 1.0, steps, float32, one process. Two trainings:

* ``lora``: uniform rank ``--rank`` on all seven projections with PEFT's init (``lora-ranks train --init cold``:
  ``train.prepare_lora_run`` + ``finetune.train_loop``; TRL: ``SFTTrainer(peft_config=lora_ranks.lora_config(...))``,
  the same ranks and alphas).
* ``full``: every parameter (``finetune.train_loop``, the brief fine-tune's loop; TRL: ``SFTTrainer`` on the model).

Measured per run: tokens per second (non-padding tokens of the batches) over the steps after the first, from step
callbacks on both sides (``on_step`` / a ``TrainerCallback``); the ratio per seed is lora-ranks / TRL. The runs of a
seed alternate their order (lora-ranks first on even seeds), so that a drifting load on a shared machine favours
neither. ``--threads`` pins torch's intra-op threads on both sides.

    .venv/bin/lora-ranks base smollm2-135m     # once (~45 s; cached)
    .venv/bin/python benchmarks/bench_trl.py [--seeds 0 1 2] [--lora-steps 16] [--full-steps 8] [--threads 1] [--record]

Raw per-seed results: ``benchmarks/results/trl_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from benchmarks.bench_bf16 import _cpu_name, uniform_config, write_data  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "trl_throughput.json"


def _settings(kind: str, seed: int, args):
    from lora_ranks.settings import FinetuneSettings, LoRATrainingSettings

    common = dict(epochs=1e6, batch_size=args.batch_size, max_length=args.max_length, seed=seed,
                  gradient_checkpointing=False, precision="float32", warmup_ratio=0.1, schedule="cosine",
                  weight_decay=0.0)
    if kind == "lora":
        return LoRATrainingSettings(max_steps=args.lora_steps, learning_rate=args.lora_lr, init="cold",
                                    lora_dropout=0.0, **common)
    return FinetuneSettings(max_steps=args.full_steps, learning_rate=args.full_lr, subset_ratio=1.0, **common)


def _stamp() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    return time.perf_counter(), time.process_time()


def _rate(tokens: list[int], stamps: list[tuple[float, float]]) -> dict:
    """Tokens per second over the steps after the first (``stamps``: before the first step, then after each), per
    wall second and per CPU second of the process (on a shared machine the CPU seconds do not count the time other
    work takes the cores: with one thread, tokens per CPU second is the throughput of a quiet core)."""
    wall = stamps[-1][0] - stamps[1][0]
    cpu = stamps[-1][1] - stamps[1][1]
    return {"tokens": sum(tokens), "timed_tokens": sum(tokens[1:]), "timed_seconds": wall, "timed_cpu_seconds": cpu,
            "tokens_per_s": sum(tokens[1:]) / wall, "tokens_per_cpu_s": sum(tokens[1:]) / cpu,
            "first_step_seconds": stamps[1][0] - stamps[0][0], "steps": len(tokens)}


def run_ours(kind: str, base: str, config: Path, train: Path, seed: int, args) -> dict:
    """lora-ranks' loop, as ``lora-ranks train`` (lora) or the brief fine-tune (full) runs it."""
    from lora_ranks.finetune import prepare_examples, train_loop
    from lora_ranks.loading import load_model
    from lora_ranks.train import prepare_lora_run

    settings = _settings(kind, seed, args)
    if kind == "lora":
        run = prepare_lora_run(base, config, train, settings, device="cpu")
        model, examples, pad = run.model, run.examples, run.tokenizer.pad_token_id
    else:
        torch.manual_seed(seed)
        model, tokenizer = load_model(base, dtype=torch.float32)
        examples, _, _ = prepare_examples(train, tokenizer, max_length=settings.max_length, seed=seed)
        pad = tokenizer.pad_token_id
        model.train()
    tokens: list[int] = []
    stamps = [_stamp()]
    losses, _ = train_loop(model, examples, pad, settings, torch.device("cpu"), progress=False,
                           tokens_per_step=tokens, on_step=lambda *_: stamps.append(_stamp()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**_rate(tokens, stamps), "losses": losses, "trainable": trainable}


def run_trl(kind: str, base: str, config: Path, train: Path, seed: int, args, work: Path) -> dict:
    """TRL's SFTTrainer on the same tokenized records and collation (its defaults otherwise: what users get)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import lora_ranks
    from lora_ranks.data import collate
    from lora_ranks.finetune import prepare_examples

    settings = _settings(kind, seed, args)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    examples, _, _ = prepare_examples(train, tokenizer, max_length=settings.max_length, seed=seed)
    tokens: list[int] = []
    stamps: list[tuple[float, float]] = []

    def counting_collate(batch):
        out = collate(batch, tokenizer.pad_token_id)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    class Stamps(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            if not stamps:
                stamps.append(_stamp())

        def on_step_end(self, args_, state, control, **kwargs):
            stamps.append(_stamp())

    steps = settings.max_steps
    sft = SFTConfig(output_dir=str(work / f"trl-{kind}-{seed}"), max_steps=steps,
                    per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                    lr_scheduler_type="cosine", warmup_steps=int(settings.warmup_ratio * steps), weight_decay=0.0,
                    max_grad_norm=1.0, optim="adamw_torch", logging_steps=10**6, save_strategy="no", report_to=[],
                    seed=seed, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                    dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                    disable_tqdm=True, use_cpu=True)
    peft_config = lora_ranks.lora_config(config, model=model, lora_dropout=0.0) if kind == "lora" else None
    trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                         peft_config=peft_config, data_collator=counting_collate, callbacks=[Stamps()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    tokens = tokens[:steps]  # a prefetched batch past the last step is not trained on
    return {**_rate(tokens, stamps), "trainable": trainable}


def table(results: dict, args, minutes: float) -> str:
    runs = results["runs"]
    lines = [f"### lora-ranks' training loop against TRL's SFTTrainer on smollm2-135m, one run ({date.today()}, CPU: "
             f"{results['machine']}, {args.threads or 'all'} thread(s), torch {torch.__version__}, trl "
             f"{results['trl']})",
             "",
             f"`.venv/bin/python benchmarks/bench_trl.py {' '.join(sys.argv[1:])}` ({minutes:.1f} min). Seeds "
             f"{', '.join(map(str, args.seeds))}; the same tokenized records, batch {args.batch_size} of ≤ "
             f"{args.max_length} tokens, torch's AdamW, cosine schedule with 10% warmup, clipping at 1.0, float32; "
             f"LoRA: uniform rank {args.rank} on every projection with PEFT's init, lr {args.lora_lr:g}, "
             f"{args.lora_steps} steps; full fine-tune: every parameter, lr {args.full_lr:g}, {args.full_steps} steps. "
             "Tokens/s: non-padding tokens over the steps after the first, per CPU second of the process (with "
             f"{args.threads or 'all'} thread(s), what a quiet core does: the machine is shared) and per wall second, "
             "mean ± sd over seeds; ratio: lora-ranks / TRL per seed on CPU seconds (order alternating by seed), "
             "mean (min-max), and on wall seconds. Raw per seed: `benchmarks/results/trl_throughput.json`.",
             "",
             "| training | trainable parameters | lora-ranks tokens/CPU s | TRL SFTTrainer tokens/CPU s | "
             "ratio lora-ranks / TRL (CPU) | ratio (wall) |",
             "|---|---|---|---|---|---|"]

    def mean_sd(rows, key):
        values = [r[key] for r in rows]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    for kind, label in (("lora", "LoRA (rank 8, every projection)"), ("full", "full fine-tune")):
        by = {who: [r for r in runs if r["kind"] == kind and r["trainer"] == who] for who in ("lora-ranks", "trl")}
        if not by["trl"] or not by["lora-ranks"]:
            continue
        cpu = [o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for o, t in zip(by["lora-ranks"], by["trl"])]
        wall = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(by["lora-ranks"], by["trl"])]
        ours, theirs = mean_sd(by["lora-ranks"], "tokens_per_cpu_s"), mean_sd(by["trl"], "tokens_per_cpu_s")
        trainable = {r["trainable"] for r in by["lora-ranks"] + by["trl"]}
        lines.append(f"| {label} | {', '.join(f'{t:,}' for t in sorted(trainable))} | {ours[0]:.0f} ± {ours[1]:.0f} | "
                     f"{theirs[0]:.0f} ± {theirs[1]:.0f} | **{statistics.fmean(cpu):.2f}x** ({min(cpu):.2f}-"
                     f"{max(cpu):.2f}) | {statistics.fmean(wall):.2f}x ({min(wall):.2f}-{max(wall):.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m", help="a known base (lora-ranks base NAME) or a model folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-steps", type=int, default=16)
    parser.add_argument("--full-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-5)
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads on both sides")
    parser.add_argument("--trainings", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("LORA_RANKS_CPU_BF16", "0")  # float32 on both sides, whatever the CPU
    import trl

    from lora_ranks.bases import KNOWN_BASES, make_base

    base = str(make_base(args.base).path) if args.base in KNOWN_BASES else args.base
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, _ = write_data(work, args.train_records, 1)
        config = uniform_config(base, args.rank, work / "uniform.json")
        for i, seed in enumerate(args.seeds):
            for kind in args.trainings:
                for who in (("lora-ranks", "trl") if i % 2 == 0 else ("trl", "lora-ranks")):
                    row = (run_ours(kind, base, config, train, seed, args) if who == "lora-ranks"
                           else run_trl(kind, base, config, train, seed, args, work))
                    runs.append({"kind": kind, "trainer": who, "seed": seed, **row})
                    print(f"{kind} seed {seed} {who}: {row['tokens_per_cpu_s']:.0f} tokens/CPU s, "
                          f"{row['tokens_per_s']:.0f} tokens/s "
                          f"({row['trainable']:,} trainable)", flush=True)
    minutes = (time.perf_counter() - start) / 60
    runs.sort(key=lambda r: (r["kind"], args.seeds.index(r["seed"]), r["trainer"] != "lora-ranks"))
    results = {"date": str(date.today()), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "trl": trl.__version__, "base": base, "threads": args.threads,
               "settings": {k: v for k, v in vars(args).items() if k != "record"}, "minutes": minutes, "runs": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    emit(table(results, args, minutes), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
