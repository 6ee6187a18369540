"""Tasks of the evidence stage: fidelity report, train/eval split, equal-budget configs, held-out evaluation."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lora_ranks._io import atomic_write_json, atomic_write_text
from lora_ranks.analysis import load_spectra, spectra_files
from lora_ranks.checkpoints import CheckpointPair
from lora_ranks.config import load_rank_config, modules_from_config, save_rank_config
from lora_ranks.data import load_records, tokenize_record
from lora_ranks.evidence import DeltaBasis, allocation_configs, fidelity_sweep, held_out_loss
from lora_ranks.finetune import load_causal_lm
from lora_ranks.ranks import AllocationSettings
from lora_ranks.report import write_fidelity_plot


def _examples(data_path: str, tokenizer, limit: int, seed: int = 0) -> list[dict]:
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    return [tokenize_record(r, tokenizer) for r in records[:limit]]


@task(name="split-data")
def split_data_task(data_path: str, out_dir: str, eval_fraction: float, seed: int = 0) -> tuple[str, str]:
    """Shuffle records (seeded) and write train.jsonl / eval.jsonl; the eval records are never trained on."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got eval_fraction={eval_fraction}")
    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    n_eval = max(1, int(len(records) * eval_fraction))
    out = Path(out_dir)
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in records[:n_eval]))
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records[n_eval:]))
    return str(out / "train.jsonl"), str(out / "eval.jsonl")


@task(name="fidelity-report")
def fidelity_report_task(config_path: str, svd_dir: str, eval_data_path: str, out_dir: str,
                         taus: list[float], eval_samples: int = 200) -> str:
    """Fidelity sweep (tau, budget, uniform) of extracted adapters on held-out records; JSON + plot + artifact."""
    config = load_rank_config(config_path)
    identity = config["analysis_metadata"]["checkpoints"]
    base_dir, ft_dir = identity["pretrained"]["path"], identity["finetuned"]["path"]
    base, tokenizer = load_causal_lm(base_dir)
    finetuned, _ = load_causal_lm(ft_dir)
    modules = modules_from_config(config)
    basis = DeltaBasis(CheckpointPair(base_dir, ft_dir), modules)
    settings = config["analysis_metadata"]["settings"]
    points = fidelity_sweep(base, finetuned, basis, load_spectra(spectra_files(svd_dir)), _examples(eval_data_path, tokenizer, eval_samples),
                            tokenizer.pad_token_id, taus=taus, min_rank=settings["min_rank"], max_rank=settings["max_rank"])
    rows = [{**{k: v for k, v in asdict(p).items() if k != "ranks"}, "loss_difference": p.loss_difference} for p in points]
    out = Path(out_dir)
    atomic_write_json(out / "fidelity.json", {"points": rows, "eval_data": eval_data_path, "eval_samples": eval_samples})
    plot = write_fidelity_plot(out, points)
    create_table_artifact(key="fidelity-table", table=rows, description="Fidelity of extracted adapters")
    image = base64.b64encode(Path(plot).read_bytes()).decode()
    create_markdown_artifact(key="fidelity-curve", markdown=f"# Fidelity vs parameters\n\n![fidelity](data:image/png;base64,{image})\n",
                             description="Trainable parameters vs KL to the fine-tuned model")
    get_run_logger().info("Fidelity report: %s", out / "fidelity.json")
    return str(out / "fidelity.json")


@task(name="allocation-configs")
def allocation_configs_task(config_path: str, svd_dir: str, out_dir: str) -> dict[str, str]:
    """uniform / energy / budget rank configs at (about) the energy config's parameter count."""
    config = load_rank_config(config_path)
    s = config["analysis_metadata"]["settings"]
    settings = AllocationSettings(energy_threshold=s["energy_threshold"], min_rank=s["min_rank"], max_rank=s["max_rank"],
                                  smoothing=s["smoothing"], smoothing_window=s["smoothing_window"], round_to=s["round_to"])
    configs = allocation_configs(modules_from_config(config), load_spectra(spectra_files(svd_dir)), config["base_parameters"], settings)
    paths = {}
    for label, cfg in configs.items():
        paths[label] = str(save_rank_config(Path(out_dir) / f"{label}.json", cfg))
        get_run_logger().info("%s ranks: %s trainable parameters", label, f"{cfg['trainable_parameters']:,}")
    return paths


@task(name="evaluate-adapter", task_run_name="evaluate-{label}-seed{seed}")
def evaluate_adapter_task(base_model: str, adapter_dir: str, eval_data_path: str, label: str, seed: int,
                          eval_samples: int = 200) -> float:
    """Held-out loss (nats per response token) of base + adapter."""
    from lora_ranks.model import load_peft_checkpoint

    model, tokenizer = load_peft_checkpoint(base_model, adapter_dir)
    return held_out_loss(model, _examples(eval_data_path, tokenizer, eval_samples), tokenizer.pad_token_id)
