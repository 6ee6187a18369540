"""Tasks of the dynamic-LoRA training stage."""

from __future__ import annotations

from prefect import get_run_logger, task

from lora_ranks.extract import extract_lora
from lora_ranks.settings import ExtractionSettings, LoRATrainingSettings
from lora_ranks.train import TrainResult, train_dynamic_lora
from tasks._common import retry_if_transient


@task(name="extract-lora")
def extract_lora_task(base: str, finetuned: str, rank_config_path: str, out_dir: str, allow_pickle: bool = False,
                      settings: ExtractionSettings = ExtractionSettings()) -> str:
    """The best adapter of the full fine-tune at the configured ranks (used as a warm start)."""
    report = extract_lora(base, finetuned, rank_config_path, out_dir, allow_pickle=allow_pickle, settings=settings)
    for server, problem in report.serving_problems.items():
        get_run_logger().warning("Serving: %s %s (see %s/README.md)", server, problem, out_dir)
    get_run_logger().info("Extracted %d modules to %s (%s truncation): mean relative error %.4f, max %.4f",
                          len(report.modules), out_dir, report.truncation, report.mean_relative_error,
                          report.max_relative_error)
    return out_dir


@task(name="train-dynamic-lora", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def train_dynamic_lora_task(model: str, rank_config_path: str, data_path: str, out_dir: str,
                            settings: LoRATrainingSettings, init_from: str | None = None,
                            trust_remote_code: bool = False) -> TrainResult:
    """Train the adapter (progress logged every few seconds); logs the trainable-parameter count and share."""
    logger = get_run_logger()
    result = train_dynamic_lora(model, rank_config_path, data_path, out_dir, settings, init_from=init_from,
                                trust_remote_code=trust_remote_code)
    logger.info("Trainable parameters: %s of %s (%.3f%%); trained in %s; adapter saved to %s",
                f"{result.trainable_parameters:,}", f"{result.total_parameters:,}", 100 * result.trainable_share,
                "bf16 autocast (frozen base in bf16)" if result.bf16 else "float32", result.adapter_dir)
    for server, problem in result.serving_problems.items():
        logger.warning("Serving: %s %s; `lora-ranks export %s --out %s-uniform` writes an exact copy every server "
                       "reads right (see the adapter's README.md)", server, problem, result.adapter_dir, result.adapter_dir)
    return result
