"""Prefect flows composing the tasks: svd-analysis, preliminary-finetune (more in later stages)."""
