"""Tasks of the preliminary fine-tune stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

import lora_ranks.data as data_module
import lora_ranks.finetune as finetune_module
import lora_ranks.training_loop as training_loop_module
from lora_ranks._version import __version__
from lora_ranks.analysis import AnalysisPlan
from lora_ranks.devices import bf16_units
from lora_ranks.finetune import FinetuneResult, run_preliminary_finetune
from lora_ranks.settings import FinetuneSettings
from lora_ranks.spectra import default_device
from lora_ranks.synthetic import DEMO_MODEL, build_demo_inputs
from tasks._cache import code_identity, file_digest, folder_digest
from tasks._common import retry_if_transient


@task(name="build-demo-inputs")
def build_demo_inputs_task(out_dir: str, data_path: str | None = None, model: str = DEMO_MODEL) -> tuple[str, str]:
    """The offline demo's inputs: the demo base (``model``: the text or the vision-language demo) and synthetic
    records (unless ``data_path`` is given). Returns (model folder, dataset path)."""
    model_dir, data = build_demo_inputs(out_dir, data_path, model)
    get_run_logger().info("Demo model at %s and data at %s", model_dir, data)
    return str(model_dir), str(data)


@task(name="preliminary-finetune", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def preliminary_finetune_task(model_path: str, data_path: str, out_dir: str, settings: FinetuneSettings,
                              trust_remote_code: bool = False) -> FinetuneResult:
    """Brief full fine-tune; its progress (step, loss, rate, time left) is logged every few seconds."""
    logger = get_run_logger()
    result = run_preliminary_finetune(model_path, data_path, out_dir, settings,
                                      trust_remote_code=trust_remote_code)
    logger.info("Fine-tuned %d steps in %.1f s (%s): loss %.4f -> %.4f; pair at %s and %s", result.steps,
                result.seconds, "bf16 autocast" if result.bf16 else "float32", result.losses[0], result.losses[-1],
                result.pretrained_dir, result.finetuned_dir)
    return result


def split_half_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key of ``split-half-finetunes``: the base model folder's files and the data file's bytes, the settings,
    the device type and its bf16 units (what precision "auto" resolves to), the fine-tuning code
    (``lora_ranks.finetune``, ``lora_ranks.training_loop`` and ``lora_ranks.data``, with the version) and the output
    folder; never the run. A rerun of ``svd-analysis`` with the same inputs reuses the two fine-tunes, as a resumed
    ``compare`` reuses its analysis pair."""
    plan: AnalysisPlan = parameters["plan"]
    device = (plan.analysis.device or default_device().type).split(":")[0]
    identity = [folder_digest(plan.base), file_digest(plan.data_path),
                plan.finetune.to_dict(), device, bf16_units(device),
                code_identity(__version__, (finetune_module, training_loop_module, data_module)),
                str(Path(parameters["out_dir"]).resolve())]
    return "split-half-finetunes-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def split_halves_are_current(halves: tuple[str, str]) -> bool:
    """True if both fine-tuned folders a (possibly cached) result names still hold a model and its metrics."""
    for folder in halves:
        path = Path(folder)
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            return False
        if not (path.parent / "training_metrics.json").is_file():
            return False
    return True


@task(name="split-half-finetunes", task_run_name="split-half-finetunes", retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_if_transient, cache_key_fn=split_half_cache_key, persist_result=True)
def split_half_finetunes_task(plan: AnalysisPlan, out_dir: str) -> tuple[str, str]:
    """Two brief fine-tunes on disjoint halves of the fine-tuning subset (``AnalysisPlan.split_half_finetunes``, the
    split-half noise estimate); returns the two fine-tuned folders."""
    halves = plan.split_half_finetunes(out_dir)
    get_run_logger().info("Split-half fine-tunes: %s and %s", *halves)
    return halves
