"""The first import of a measuring process: a measurement's output is its result (no download bars, deprecation
notes or loading progress), set before the libraries that read these settings at import time are imported."""

import logging
import os
import warnings

os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
warnings.simplefilter("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a missing optional CPU kernel, on every import
