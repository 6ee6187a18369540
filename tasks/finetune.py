"""Tasks of the preliminary fine-tune stage."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from lora_ranks.finetune import FinetuneResult, FinetuneSettings, run_preliminary_finetune
from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset


@task(name="build-demo-inputs")
def build_demo_inputs(out_dir: str, data_path: str | None = None, num_layers: int = 4) -> tuple[str, str]:
    """Build the offline demo inputs: a tiny Qwen3 (random init) and a synthetic multi-task JSONL.

    Returns (model folder, dataset path); an existing ``data_path`` is kept as given.
    """
    logger = get_run_logger()
    model_dir = build_tiny_qwen3(Path(out_dir) / "tiny-qwen3", num_layers=num_layers)
    if data_path is None:
        data_path = str(write_synthetic_dataset(Path(out_dir) / "synthetic.jsonl", 400, fmt="mixed"))
    logger.info("Built tiny Qwen3 at %s and data at %s", model_dir, data_path)
    return str(model_dir), str(data_path)


@task(name="preliminary-finetune", retries=1, retry_delay_seconds=10)
def preliminary_finetune_task(model_path: str, data_path: str, out_dir: str, settings: FinetuneSettings,
                              trust_remote_code: bool = False) -> FinetuneResult:
    """Brief full fine-tune; logs the loss to the Prefect run log about 20 times per run."""
    logger = get_run_logger()

    def on_step(step: int, total: int, loss: float, lr: float) -> None:
        if step == 1 or step == total or step % max(1, total // 20) == 0:
            logger.info("step %d/%d loss %.4f lr %.2e", step, total, loss, lr)

    result = run_preliminary_finetune(model_path, data_path, out_dir, settings, on_step=on_step,
                                      trust_remote_code=trust_remote_code)
    logger.info("Fine-tuned %d steps in %.1f s: loss %.4f -> %.4f; pair at %s and %s", result.steps, result.seconds,
                result.losses[0], result.losses[-1], result.pretrained_dir, result.finetuned_dir)
    return result
