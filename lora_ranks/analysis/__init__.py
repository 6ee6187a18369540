"""The analysis: per-layer spectra on disk, then one rank config.

    layout.py     where a run's files go (``OutputLayout``) and the per-layer spectra file format
    layer.py      the unit of parallel work: one layer's spectra (``analyze_layer``), and the numerics identity
    curvature.py  curvature factors from the fine-tuned model on calibration records, one file per layer
    assemble.py   every layer's spectra -> ranks -> ``lora_rank_config.json``; ``analyze_checkpoints`` serially
"""

from .assemble import analyze_checkpoints, assemble_rank_config, curvature_record, zero_delta_message
from .curvature import CurvatureResult, calibration_examples, collect_layer_curvature, curvature_roots, load_curvature_file
from .layer import LayerResult, analyze_layer, numerics_identity
from .layout import (
                        OutputLayout,
                        layer_file_fingerprint,
                        layer_file_name,
                        load_layer_spectra,
                        load_spectra,
                        spectra_files,
)

__all__ = ["OutputLayout", "LayerResult", "analyze_layer", "numerics_identity", "load_layer_spectra", "load_spectra",
           "spectra_files", "layer_file_name", "layer_file_fingerprint", "assemble_rank_config", "analyze_checkpoints",
           "zero_delta_message", "curvature_record", "CurvatureResult", "collect_layer_curvature",
           "load_curvature_file", "calibration_examples", "curvature_roots"]
