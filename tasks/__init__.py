"""Prefect tasks: thin wrappers over ``lora_ranks`` adding retries, logging and UI artifacts."""
