"""Flow ``preliminary-finetune``: a brief full fine-tune on a stratified subset, saving the checkpoint pair.

Steps:
    1. (optional) build the offline demo inputs, when ``model`` is ``"demo:tiny-qwen3"``;
    2. fine-tune and write saved_models/preliminary_finetune/{pretrained,finetuned,training_metrics.json}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from flows._runtime import apply_defaults

apply_defaults()

from prefect import flow  # noqa: E402
from pydantic import Field  # noqa: E402

from lora_ranks.analysis import OutputLayout  # noqa: E402
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from lora_ranks.finetune import FinetuneResult, FinetuneSettings  # noqa: E402
from tasks.finetune import build_demo_inputs, preliminary_finetune_task  # noqa: E402


@flow(name="preliminary-finetune")
def preliminary_finetune(
    model: Annotated[str, Field(description=f"Base model folder or hub id, or '{DEMO_MODEL}'")] = DEMO_MODEL,
    data_path: Annotated[Optional[str], Field(description="JSON/JSONL dataset; empty with the demo model = synthetic")] = None,
    output_dir: Annotated[str, Field(description="Root output folder")] = "outputs/preliminary-finetune",
    subset_ratio: Annotated[float, Field(gt=0, le=1, description="Fraction of records to train on")] = 0.01,
    max_samples: Annotated[int, Field(ge=1, description="Cap on the subset size")] = 1000,
    max_steps: Annotated[int, Field(ge=1, description="Optimizer steps")] = 100,
    learning_rate: Annotated[float, Field(gt=0, description="Peak learning rate")] = 1e-4,
    batch_size: Annotated[int, Field(ge=1, description="Micro-batch size")] = 4,
    grad_accumulation: Annotated[int, Field(ge=1, description="Micro-batches per step")] = 1,
    gradient_checkpointing: Annotated[bool, Field(description="Recompute activations to save memory")] = True,
    task_key: Annotated[str, Field(description="Record field naming the task (stratification)")] = "task",
    seed: Annotated[int, Field(description="Random seed")] = 0,
    trust_remote_code: Annotated[bool, Field(description="Run Python code shipped with the model (off: safe)")] = False,
    optimizer: Annotated[Literal["adamw", "adamw8bit"], Field(description="AdamW, or bitsandbytes 8-bit AdamW "
                                                                         "(~75% less optimizer memory)")] = "adamw",
    copy_base: Annotated[bool, Field(description="Copy a local safetensors base into pretrained/ (default: "
                                                 "reference it)")] = False,
    wandb_project: Annotated[Optional[str], Field(description="Weights & Biases project to log to (needs wandb; "
                                                            "WANDB_MODE=offline works)")] = None,
) -> FinetuneResult:
    """Brief full fine-tune; returns where the pretrained/fine-tuned pair and metrics are."""
    layout = OutputLayout(Path(output_dir).resolve())
    settings = FinetuneSettings(subset_ratio=subset_ratio, max_samples=max_samples, max_steps=max_steps,
                                learning_rate=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation,
                                gradient_checkpointing=gradient_checkpointing, task_key=task_key, seed=seed,
                                optimizer=optimizer, copy_base=copy_base, wandb_project=wandb_project)
    # Step 1: demo inputs.
    if model == DEMO_MODEL:
        model, data_path = build_demo_inputs(str(layout.root / "demo_inputs"), data_path)
    if data_path is None:
        raise ValueError("data_path is required unless model is the demo model")
    # Step 2: fine-tune.
    return preliminary_finetune_task(model, data_path, str(layout.finetune_dir), settings, trust_remote_code)


if __name__ == "__main__":
    preliminary_finetune()
