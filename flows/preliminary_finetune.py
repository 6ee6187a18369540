"""Flow ``preliminary-finetune``: a brief full fine-tune on a stratified subset, saving the checkpoint pair.

Steps:
    0. ``claim-output``: refuse an output folder that would take anything of the user's, and mark a new one
       as this tool's (``lora_ranks.outputs``);
    1. (optional) build the offline demo inputs, when ``model`` is ``"demo:tiny-qwen3"``;
    2. fine-tune and write saved_models/preliminary_finetune/{pretrained,finetuned,training_metrics.json}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from flows._runtime import apply_defaults, described, documented

apply_defaults()

from prefect import flow  # noqa: E402

from lora_ranks.analysis import OutputLayout  # noqa: E402
from lora_ranks.finetune import FinetuneResult  # noqa: E402
from lora_ranks.settings import INPUT_HELP, FinetuneSettings, SafetySettings  # noqa: E402
from lora_ranks.synthetic import DEMO_MODEL  # noqa: E402
from tasks.finetune import build_demo_inputs_task, preliminary_finetune_task  # noqa: E402
from tasks.outputs import RECORD_OUTPUTS, claim_output_task  # noqa: E402


@flow(name="preliminary-finetune", **RECORD_OUTPUTS)
@documented
def preliminary_finetune(
    model: Annotated[str, described(INPUT_HELP["base_model"])] = DEMO_MODEL,
    data_path: Annotated[Optional[str], described(INPUT_HELP["data_path"])] = None,
    output_dir: Annotated[str, described(INPUT_HELP["output_dir"])] = "outputs/preliminary-finetune",
    finetune: Annotated[FinetuneSettings, described(FinetuneSettings)] = FinetuneSettings(),
    safety: Annotated[SafetySettings, described(SafetySettings)] = SafetySettings(),
    overwrite: Annotated[bool, described(INPUT_HELP["overwrite"])] = False,
) -> FinetuneResult:
    """Brief full fine-tune; returns where the pretrained/fine-tuned pair and metrics are."""
    layout = OutputLayout(Path(claim_output_task(output_dir, "preliminary-finetune",
                                                 {"model": model, "data_path": data_path}, overwrite)))
    # Step 1: demo inputs.
    if model == DEMO_MODEL:
        model, data_path = build_demo_inputs_task(str(layout.demo_inputs_dir), data_path)
    if data_path is None:
        raise ValueError("data_path is required unless model is the demo model")
    # Step 2: fine-tune.
    return preliminary_finetune_task(model, data_path, str(layout.finetune_dir), finetune, safety.trust_remote_code)


if __name__ == "__main__":
    preliminary_finetune()
