"""Flow ``train-dynamic-lora``: train a LoRA whose per-module ranks come from a rank config.

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. (init "warm", the default) extract the best adapter of the fine-tuned model the ranks came from, at these
       ranks, as the starting point;
    2. train the dynamic-rank LoRA (optionally on a 4-bit or 8-bit base) and save the adapter.
"""

from __future__ import annotations

from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented

apply_defaults()

from prefect import flow  # noqa: E402

from lora_ranks.config import load_rank_config  # noqa: E402
from lora_ranks.settings import INPUT_HELP, ExtractionSettings, LoRATrainingSettings, SafetySettings  # noqa: E402
from lora_ranks.train import TrainLayout, TrainResult, warm_start_source  # noqa: E402
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402
from tasks.train import extract_lora_task, train_dynamic_lora_task  # noqa: E402


@flow(name="train-dynamic-lora", **RECORD_OUTPUTS)
@documented
def train_dynamic_lora_flow(
    model: Annotated[str, described(INPUT_HELP["base_model"])],
    rank_config: Annotated[str, described(INPUT_HELP["rank_config"])],
    data_path: Annotated[str, described(INPUT_HELP["data_path"])],
    output_dir: Annotated[str, described(INPUT_HELP["output_dir"])] = "outputs/train-dynamic-lora",
    training: Annotated[LoRATrainingSettings, described(LoRATrainingSettings)] = LoRATrainingSettings(),
    warm_start_from: Annotated[Optional[str], described(INPUT_HELP["warm_start_from"])] = None,
    extraction: Annotated[ExtractionSettings, described(ExtractionSettings)] = ExtractionSettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
) -> TrainResult:
    """Train a heterogeneous-rank LoRA; returns where the adapter and metrics are."""
    source = warm_start_source(load_rank_config(rank_config), warm_start_from, training.init)
    layout = TrainLayout(claim_output_task(output_dir, "train-dynamic-lora", {
        "model": model, "rank_config": rank_config, "data_path": data_path,
        "the warm start's fine-tuned model": None if source is None else str(source)}, overwrite))
    # Step 1: the SVD warm start (training.init "warm"): extracted from the fine-tuned model the ranks came from.
    init_from = None
    if source is not None:
        init_from = extract_lora_task(model, str(source), rank_config, str(layout.warm_start_dir),
                                      safety.allow_pickle, extraction)
    # Step 2: train.
    return train_dynamic_lora_task(model, rank_config, data_path, str(layout.root), training, init_from,
                                   safety.trust_remote_code)


if __name__ == "__main__":
    import sys

    train_dynamic_lora_flow(*sys.argv[1:4])
