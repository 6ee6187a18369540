"""One model construction at a time per process.

transformers' ``from_pretrained`` disables weight tying by swapping ``PreTrainedModel.tie_weights`` for a no-op on the
class while it builds the model, and restores the method it saw on entry (``transformers.initialization.
no_tie_weights``; upstream huggingface/transformers#44940). Two threads inside it at once (Prefect's thread-pool task
runner does this: rows, layers) can restore each other's no-op, and every tied model built in the process afterwards
keeps a randomly initialised output head instead of its embedding. Any model built while another thread is inside
that window is untied the same way. Every construction in lora_ranks (``load_model``, ``build_meta_model``) holds
this lock, so the window is never shared.
"""

from __future__ import annotations

import threading

__all__ = ["MODEL_CONSTRUCTION"]

MODEL_CONSTRUCTION = threading.RLock()
