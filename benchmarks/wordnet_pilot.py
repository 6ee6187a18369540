"""The pilot that sized ``wordnet_benchmark.py`` (issue 37): one row (PEFT's ``LoraConfig()`` at rank 8), one
learning rate, one seed, trained with the benchmark's early stopping on its WordNet data; prints the seconds per
step, the validation curve, where it stopped and the held-out numbers, and writes them to ``<out>/pilot.json``.

    .venv/bin/python benchmarks/wordnet_pilot.py [--learning-rate 2.7e-3] [--out outputs/wordnet-smollm2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.wordnet_benchmark import SIZES, baselines, build_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--out", default="outputs/wordnet-smollm2")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results" / "wordnet-smollm2")
    parser.add_argument("--learning-rate", type=float, default=2.7e-3)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()

    from lora_ranks._io import atomic_write_json
    from lora_ranks.bases import KNOWN_BASES, make_base
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import save_rank_config
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks
    from lora_ranks.evidence.runs import RowEvaluation, RowSpec, train_row
    from lora_ranks.settings import LoRATrainingSettings

    out = Path(args.out).resolve() / "pilot"
    out.mkdir(parents=True, exist_ok=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = str(make_base(args.base).path) if args.base in KNOWN_BASES else args.base
    paths = build_data(out.parent, 0, SIZES)
    started = time.perf_counter()
    base_line = baselines(base, paths, args.results_dir, "cpu")
    print("baselines:", json.dumps(base_line), f"({time.perf_counter() - started:.0f} s)", flush=True)
    pair = CheckpointPair(base, base)
    modules = pair.modules()
    config = save_rank_config(out / "r8-uniform.json",
                              config_from_ranks(modules, uniform_ranks(modules, 8), pair.base_parameters))
    settings = LoRATrainingSettings(max_steps=10**6, epochs=args.epochs, batch_size=8, learning_rate=args.learning_rate,
                                    max_length=128, gradient_checkpointing=False, lora_dropout=0.0, warmup_ratio=0.05)
    evaluation = RowEvaluation(paths["eval"], 10**6, 128, accuracy_samples=10**6, max_new_tokens=8,
                               validation_data_path=paths["validation"], eval_interval=args.eval_interval,
                               patience=args.patience, validation_samples=10**6, accuracy_tasks=("category", "word"),
                               accuracy_batch_size=32)
    started = time.perf_counter()
    result = train_row(base, RowSpec("r8-uniform", "default", 0, str(config)), paths["train"],
                       out / f"default-lr{args.learning_rate:g}", settings, evaluation, progress=True)
    wall = time.perf_counter() - started
    summary = {"learning_rate": args.learning_rate, "steps": result.steps, "best_step": result.best_step,
               "stopped": result.stopped, "seconds_training": result.seconds, "seconds_per_step": result.seconds /
               max(1, result.steps), "wall_seconds": wall, "loss": result.loss, "validation_loss": result.validation_loss,
               "accuracy_by_task": result.accuracy_by_task, "train_flops": result.train_flops,
               "validation_curve": result.validation_curve}
    atomic_write_json(out / "pilot.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
