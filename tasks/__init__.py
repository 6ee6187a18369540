"""Prefect tasks: thin wrappers over ``lora_ranks`` adding retries, caching, logging and UI artifacts."""

from tasks._common import install_progress_forwarding, install_traceback_filter

install_traceback_filter()  # in every process that runs tasks: flow processes, pool workers, Dask workers
install_progress_forwarding()
