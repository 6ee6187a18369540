"""Flow ``train-dynamic-lora``: train a LoRA whose per-module ranks come from a rank config.

Steps:
    1. (optional) extract the truncated-SVD adapter of a full fine-tune, as a warm start;
    2. train the dynamic-rank LoRA (optionally on a 4-bit or 8-bit base) and save the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from flows._runtime import apply_defaults

apply_defaults()

from prefect import flow  # noqa: E402
from pydantic import Field  # noqa: E402

from lora_ranks.finetune import FinetuneSettings  # noqa: E402
from lora_ranks.train import TrainResult  # noqa: E402
from tasks.train import extract_lora_task, train_dynamic_lora_task  # noqa: E402


@flow(name="train-dynamic-lora")
def train_dynamic_lora_flow(
    model: Annotated[str, Field(description="Base model folder or hub id")],
    rank_config: Annotated[str, Field(description="lora_rank_config.json from svd-analysis")],
    data_path: Annotated[str, Field(description="JSON/JSONL training data")],
    output_dir: Annotated[str, Field(description="Where adapter/ and training_metrics.json go")] = "outputs/train-dynamic-lora",
    quantization: Annotated[Optional[Literal["4bit", "8bit"]], Field(description="Quantize the base (QLoRA)")] = None,
    warm_start_from: Annotated[Optional[str], Field(description="Fine-tuned model folder: start from the truncated "
                                                              "SVD of its delta instead of PEFT's init")] = None,
    max_steps: Annotated[int, Field(ge=1, description="Optimizer steps")] = 200,
    epochs: Annotated[float, Field(gt=0, description="Passes over the data (caps max_steps)")] = 1.0,
    learning_rate: Annotated[float, Field(gt=0, description="Peak learning rate")] = 2e-4,
    batch_size: Annotated[int, Field(ge=1, description="Micro-batch size")] = 4,
    grad_accumulation: Annotated[int, Field(ge=1, description="Micro-batches per step")] = 1,
    gradient_checkpointing: Annotated[bool, Field(description="Recompute activations to save memory")] = True,
    seed: Annotated[int, Field(description="Random seed")] = 0,
    trust_remote_code: Annotated[bool, Field(description="Run Python code shipped with the model (off: safe)")] = False,
) -> TrainResult:
    """Train a heterogeneous-rank LoRA; returns where the adapter and metrics are."""
    out = Path(output_dir).resolve()
    settings = FinetuneSettings(subset_ratio=1.0, max_samples=10**9, max_steps=max_steps, epochs=epochs,
                                learning_rate=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation,
                                gradient_checkpointing=gradient_checkpointing, seed=seed)
    # Step 1: optional SVD warm start.
    init_from = None
    if warm_start_from is not None:
        init_from = extract_lora_task(model, warm_start_from, rank_config, str(out / "warm_start_adapter"))
    # Step 2: train.
    return train_dynamic_lora_task(model, rank_config, data_path, str(out), settings, quantization, init_from,
                                   trust_remote_code)


if __name__ == "__main__":
    import sys

    train_dynamic_lora_flow(*sys.argv[1:4])
