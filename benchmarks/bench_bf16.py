"""Benchmark: training in bf16 against float32 on SmolLM2-135M-Instruct, side by side in one run (issue 38, item 3).

Two trainings, each on every seed in both precisions (the order alternating by seed, so that a drifting load on a
shared machine favours neither):

* ``lora``: LoRA training as ``lora-ranks train`` runs it (``train.prepare_lora_run`` + ``finetune.train_loop``):
  uniform rank ``--rank`` on every projection, cold init; under bf16 the frozen base is stored in bf16 and the
  products run under autocast, the LoRA weights and AdamW's state stay float32.
* ``full``: the brief full fine-tune's loop on every parameter (float32 master weights; bf16 = autocast only).
* ``lora-autocast`` (``--trainings``, not run by default): the LoRA with its base kept in float32 under bf16
  autocast, what the bf16 storage of the base adds to plain autocast.

Measured per run: tokens per second of the training steps after the first (the first also creates the optimizer's
state), from the loop's own step callbacks; the held-out loss (nats per label token) after the same steps, always
evaluated in float32 (a bf16 LoRA's float32 adapter reloaded onto the float32 base), and for a bf16 LoRA also in
place, on the bf16-stored base it trained on (why ``compare``'s rows keep their base in float32). The ratio per
seed is bf16 / float32 tokens per second of that seed's pair of runs. The records are the demo's synthetic tasks
(``synthetic_records``), the held-out ones generated with another seed and sharing no record with the training ones.

On a CPU without bf16 units (no avx512_bf16 / amx_bf16) training's precision auto is float32 and a forced bf16 is
refused; ``--emulate-bf16`` pretends the units are there, so that torch emulates bf16 and what it would cost (and do
to the loss) is measured anyway; the table says so.

    .venv/bin/lora-ranks base smollm2-135m     # once (~45 s; cached)
    .venv/bin/python benchmarks/bench_bf16.py [--seeds 0 1 2] [--lora-steps 12] [--full-steps 8] [--emulate-bf16] [--record]
    .venv/bin/python benchmarks/bench_bf16.py --trainings lora lora-autocast full    # on a CPU with bf16 units
    .venv/bin/python benchmarks/bench_bf16.py --table-only                            # the last results' table again

Raw per-seed results: ``benchmarks/results/bf16.json``.
"""

from __future__ import annotations

import argparse
import json
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

import lora_ranks.devices as devices  # noqa: E402
from benchmarks._common import emit  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bf16.json"


def write_data(root: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Training records (seed 0) and held-out ones (seed 1) of the demo's tasks, no held-out record in training."""
    from lora_ranks.synthetic import synthetic_records

    train = synthetic_records(max(1, n_train // 5), fmt="mixed", seed=0)[:n_train]
    seen = {json.dumps(r, sort_keys=True) for r in train}
    held_out = [r for r in synthetic_records(max(1, n_eval // 2), fmt="mixed", seed=1)
                if json.dumps(r, sort_keys=True) not in seen][:n_eval]
    paths = root / "train.jsonl", root / "eval.jsonl"
    for path, records in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def uniform_config(base: str, rank: int, path: Path) -> Path:
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import save_rank_config
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks

    modules = CheckpointPair(base, base).modules()
    base_parameters = sum(m.shape[0] * m.shape[1] for m in modules)
    return save_rank_config(path, config_from_ranks(modules, uniform_ranks(modules, rank), base_parameters))


def _timed_loop(model, examples, pad, settings, device) -> dict:
    """``train_loop`` with its step times: tokens per second over the steps after the first."""
    from lora_ranks.finetune import train_loop

    tokens: list[int] = []
    stamps = [time.perf_counter()]
    losses, bf16 = train_loop(model, examples, pad, settings, device, progress=False, tokens_per_step=tokens,
                              on_step=lambda *_: stamps.append(time.perf_counter()))
    timed = sum(tokens[1:])
    seconds = stamps[-1] - stamps[1]
    return {"bf16": bf16, "train_losses": losses, "tokens": sum(tokens), "timed_tokens": timed,
            "timed_seconds": seconds, "tokens_per_s": timed / seconds, "first_step_seconds": stamps[1] - stamps[0]}


def run_lora(base: str, config: Path, train: Path, eval_records, precision: str, seed: int, args, work: Path,
             float32_base: bool = False) -> dict:
    from lora_ranks.evidence.fidelity import held_out_loss
    from lora_ranks.model import load_peft_checkpoint, save_adapter
    from lora_ranks.settings import LoRATrainingSettings
    from lora_ranks.train import prepare_lora_run

    settings = LoRATrainingSettings(max_steps=args.lora_steps, epochs=1e6, batch_size=args.batch_size,
                                    max_length=args.max_length, learning_rate=args.lora_lr, init="cold", seed=seed,
                                    lora_dropout=0.0, gradient_checkpointing=False, precision=precision)
    run = prepare_lora_run(base, config, train, settings.replace(precision="float32") if float32_base else settings,
                           device="cpu")
    row = _timed_loop(run.model, run.examples, run.tokenizer.pad_token_id, settings, run.device)
    pad = run.tokenizer.pad_token_id
    row["held_out_loss_in_place"] = held_out_loss(run.model, eval_records(run.tokenizer), pad)
    adapter = save_adapter(run.model, work / f"adapter-{precision}-{seed}-{float32_base}", run.config)
    del run
    model, tokenizer = load_peft_checkpoint(base, adapter, dtype=torch.float32)
    row["held_out_loss"] = held_out_loss(model, eval_records(tokenizer), pad)
    return row


def run_full(base: str, train: Path, eval_records, precision: str, seed: int, args) -> dict:
    from lora_ranks.evidence.fidelity import held_out_loss
    from lora_ranks.finetune import prepare_examples
    from lora_ranks.loading import load_model
    from lora_ranks.settings import FinetuneSettings

    settings = FinetuneSettings(max_steps=args.full_steps, epochs=1e6, batch_size=args.batch_size,
                                max_length=args.max_length, learning_rate=args.full_lr, seed=seed, subset_ratio=1.0,
                                gradient_checkpointing=False, precision=precision)
    devices.resolve_precision(precision, "cpu")
    torch.manual_seed(seed)
    model, tokenizer = load_model(base, dtype=torch.float32)
    examples, _, _ = prepare_examples(train, tokenizer, max_length=settings.max_length, seed=seed)
    model.train()
    row = _timed_loop(model, examples, tokenizer.pad_token_id, settings, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    row["held_out_loss"] = held_out_loss(model, eval_records(tokenizer), tokenizer.pad_token_id)
    return row


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.partition(":")[2].strip()
    except (OSError, StopIteration):
        return platform.machine()


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict, path: Path = RESULTS) -> str:
    """The Markdown table of a run's results (``results``: what ``path``, ``bf16.json`` by default, holds)."""
    runs, args, units = results["runs"], argparse.Namespace(**results["settings"]), results["bf16_units"]
    how = (f"bf16 units: {units}" if units else "**no bf16 units on this CPU: bf16 emulated by torch "
           "(`--emulate-bf16`)**")
    command = "`.venv/bin/python benchmarks/bench_bf16.py " + " ".join(results["argv"]) + "`"
    minutes = results["minutes"]
    lines = [f"### bf16 against float32 on smollm2-135m (dequantized from 4 bits), one run ({results['date']}, CPU: "
             f"{results['machine']}, torch {torch.__version__})",
             "",
             f"{command} ({minutes:.1f} min; {how}). Seeds {', '.join(map(str, args.seeds))}; batch {args.batch_size} "
             f"records of ≤ {args.max_length} tokens; LoRA: uniform rank {args.rank} on all 210 projections, cold, "
             f"lr {args.lora_lr:g}, {args.lora_steps} steps; full fine-tune: every parameter, lr {args.full_lr:g}, "
             f"{args.full_steps} steps. Tokens/s over the steps after the first; held-out loss (nats/token, "
             f"{results['n_eval']} records) in float32 after the last step, mean ± sd over seeds; ratio: bf16 / "
             f"float32 tokens/s per seed, mean (min-max). Raw per seed: `{path.resolve().relative_to(REPO)}`.",
             "",
             "| training | float32 tokens/s | bf16 tokens/s | ratio bf16 / float32 | float32 held-out loss | "
             "bf16 held-out loss | bf16 - float32 (per seed, mean ± sd) |",
             "|---|---|---|---|---|---|---|"]
    for kind, label in (("lora", "LoRA (base stored in bf16)"), ("lora-autocast", "LoRA, autocast only (base in "
                        "float32)"), ("full", "full fine-tune (autocast only)")):
        by = {p: [r for r in runs if r["kind"] == kind and r["precision"] == p] for p in ("float32", "bf16")}
        if not by["float32"] or not by["bf16"]:
            continue
        ratios = [b["tokens_per_s"] / f["tokens_per_s"] for f, b in zip(by["float32"], by["bf16"])]
        diffs = [b["held_out_loss"] - f["held_out_loss"] for f, b in zip(by["float32"], by["bf16"])]
        speed = {p: _mean_sd([r["tokens_per_s"] for r in by[p]]) for p in by}
        loss = {p: _mean_sd([r["held_out_loss"] for r in by[p]]) for p in by}
        lines.append(f"| {label} | {speed['float32'][0]:.1f} ± {speed['float32'][1]:.1f} | {speed['bf16'][0]:.1f} ± "
                     f"{speed['bf16'][1]:.1f} | **{statistics.fmean(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | "
                     f"{loss['float32'][0]:.4f} ± {loss['float32'][1]:.4f} | {loss['bf16'][0]:.4f} ± "
                     f"{loss['bf16'][1]:.4f} | {_mean_sd(diffs)[0]:+.4f} ± {_mean_sd(diffs)[1]:.4f} |")
    in_place = [r["held_out_loss_in_place"] - r["held_out_loss"] for r in runs
                if r["kind"] == "lora" and r["precision"] == "bf16"]
    if in_place:
        lines += ["", f"A bf16 LoRA evaluated in place, on the bf16-stored base it trained on, minus the same adapter "
                      f"on the float32 base: {_mean_sd(in_place)[0]:+.4f} ± {_mean_sd(in_place)[1]:.4f} nats/token "
                      "(mean ± sd over seeds)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m", help="a known base (lora-ranks base NAME) or a model folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-steps", type=int, default=12)
    parser.add_argument("--full-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-5)
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--eval-records", type=int, default=64)
    parser.add_argument("--trainings", nargs="+", choices=("lora", "full", "lora-autocast"), default=["lora", "full"])
    parser.add_argument("--emulate-bf16", action="store_true",
                        help="on a CPU without bf16 units, pretend they are there (torch emulates bf16)")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the raw per-seed results (written, or read "
                        "with --table-only); bf16-avx512.json holds the run on a CPU with bf16 units")
    parser.add_argument("--table-only", action="store_true", help="print the table of the last results again (no run)")
    args = parser.parse_args()
    if args.table_only:
        emit(table(json.loads(args.results.read_text()), args.results), args.record)
        return 0

    units = devices.cpu_bf16_units()
    if units is None:
        if not args.emulate_bf16:
            sys.exit("this CPU has no bf16 units (no avx512_bf16 / amx_bf16): training's precision auto is float32 "
                     "here and a forced bf16 is refused; --emulate-bf16 measures emulated bf16 anyway")
        devices._detected_cpu_bf16_units = lambda: "emulated"  # this process only
        os.environ.pop(devices.HIDE_CPU_BF16, None)
    from lora_ranks.bases import KNOWN_BASES, make_base
    from lora_ranks.evidence.comparison import eval_examples

    base = str(make_base(args.base).path) if args.base in KNOWN_BASES else args.base
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, held_out = write_data(work, args.train_records, args.eval_records)
        n_eval = sum(1 for _ in open(held_out))
        config = uniform_config(base, args.rank, work / "uniform.json")

        def eval_records(tokenizer):
            return eval_examples(str(held_out), tokenizer, args.eval_records, args.max_length)

        for i, seed in enumerate(args.seeds):
            for kind in args.trainings:
                for precision in (("float32", "bf16") if i % 2 == 0 else ("bf16", "float32")):
                    row = (run_full(base, train, eval_records, precision, seed, args) if kind == "full" else
                           run_lora(base, config, train, eval_records, precision, seed, args, work,
                                    float32_base=kind == "lora-autocast"))
                    runs.append({"kind": kind, "precision": precision, "seed": seed, **row})
                    print(f"{kind} seed {seed} {precision}: {row['tokens_per_s']:.0f} tokens/s, held-out loss "
                          f"{row['held_out_loss']:.4f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    for row in runs:  # pair each seed's runs in float32, bf16 order for the table
        row["order"] = args.seeds.index(row["seed"])
    runs.sort(key=lambda r: (r["kind"], r["order"], r["precision"] != "float32"))
    results = {"date": str(date.today()), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "bf16_units": units, "emulated": units is None, "base": base,
               "settings": {k: v for k, v in vars(args).items() if k not in ("record", "table_only")},
               "argv": sys.argv[1:], "n_eval": n_eval,
               "minutes": minutes, "runs": [{k: v for k, v in r.items() if k != "order"} for r in runs]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    emit(table(results, args.results), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
