"""The file names of an adapter folder, in one place: PEFT's two, and the tool's own beside them.

    <adapter>/adapter_config.json          PEFT's LoraConfig (ADAPTER_CONFIG)
    <adapter>/adapter_model.safetensors    PEFT's weights (ADAPTER_WEIGHTS)
    <adapter>/lora_rank_config.json        the rank config it was built from (RANK_CONFIG; a run's is under configs/)
    <adapter>/lora_ranks_adapter.json      how it was made: extract / train / export, quantization (PROVENANCE)
    <adapter>/extraction_report.json       ``extract``'s report (EXTRACTION_REPORT)
    <adapter>/export_report.json           ``export``'s report (EXPORT_REPORT)
"""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RANK_CONFIG = "lora_rank_config.json"
PROVENANCE = "lora_ranks_adapter.json"
EXTRACTION_REPORT = "extraction_report.json"
EXPORT_REPORT = "export_report.json"

#: The prefix of every tensor name in PEFT's weights file: ``base_model.model.<module>.lora_A.weight``.
PEFT_KEY_PREFIX = "base_model.model."
