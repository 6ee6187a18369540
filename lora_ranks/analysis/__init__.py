"""The analysis: per-layer spectra on disk, then one rank config.

    layout.py     where a run's files go (``OutputLayout``) and the per-layer spectra file format
    layer.py      the unit of parallel work: one layer's spectra (``analyze_layer``), and the numerics identity
    curvature.py  curvature factors from the fine-tuned model on calibration records, one file per layer
    split_half.py the split-half noise estimate: directions two fine-tunes on disjoint halves of the data share
    assemble.py   every layer's spectra -> ranks -> ``lora_rank_config.json``
    plan.py       one analysis as data (``AnalysisPlan``): its checks before any work, its steps, its metadata
    serial.py     the whole plan in one process, layer after layer (``analyze_checkpoints``)
"""

from importlib import import_module

_EXPORTS = {
    "analyze_checkpoints": "serial", "assemble_rank_config": "assemble", "zero_delta_message": "assemble",
    "CurvatureResult": "curvature", "calibration_examples": "curvature", "collect_layer_curvature": "curvature",
    "config_curvature_roots": "curvature", "curvature_roots": "curvature", "dense_roots": "curvature",
    "input_weighted_spectra": "curvature",
    "load_curvature_file": "curvature",
    "LayerResult": "layer", "analyze_layer": "layer", "numerics_identity": "layer",
    "Layout": "layout", "OutputLayout": "layout", "layer_file_fingerprint": "layout", "layer_file_name": "layout",
    "load_layer_spectra": "layout", "load_spectra": "layout", "spectra_files": "layout", "SpectrumFacts": "layout",
    "LayerFileMetadata": "layout",
    "AnalysisPlan": "plan", "StepClock": "plan",
    "SplitHalfModule": "split_half", "split_half_ranks": "split_half",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use: the command line checks an AnalysisPlan's inputs before torch is imported.
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
