"""The analysis: per-layer spectra on disk, then one rank config.

    layout.py     where a run's files go (``OutputLayout``) and the per-layer spectra file format
    layer.py      the unit of parallel work: one layer's spectra (``analyze_layer``), and the numerics identity
    curvature.py  curvature factors from the fine-tuned model on calibration records, one file per layer
    split_half.py the split-half noise estimate: directions two fine-tunes on disjoint halves of the data share
    assemble.py   every layer's spectra -> ranks -> ``lora_rank_config.json``; ``analyze_checkpoints`` serially
    checks.py     what is checked before any work: device, headers, budget, NaN or identical weights
"""

from .assemble import analyze_checkpoints, assemble_rank_config, curvature_record, zero_delta_message
from .checks import check_before_finetune, check_pair
from .curvature import (
                        CurvatureResult,
                        calibration_examples,
                        collect_layer_curvature,
                        config_curvature_roots,
                        curvature_roots,
                        input_weighted_spectra,
                        load_curvature_file,
)
from .layer import LayerResult, analyze_layer, numerics_identity
from .layout import (
                        OutputLayout,
                        layer_file_fingerprint,
                        layer_file_name,
                        load_layer_spectra,
                        load_spectra,
                        spectra_files,
)
from .split_half import split_half_ranks

__all__ = ["OutputLayout", "LayerResult", "analyze_layer", "numerics_identity", "load_layer_spectra", "load_spectra",
           "spectra_files", "layer_file_name", "layer_file_fingerprint", "assemble_rank_config", "analyze_checkpoints",
           "zero_delta_message", "curvature_record", "CurvatureResult", "collect_layer_curvature",
           "load_curvature_file", "calibration_examples", "curvature_roots", "config_curvature_roots",
           "input_weighted_spectra", "split_half_ranks", "check_pair", "check_before_finetune"]
