"""Where a run's files go, and the per-layer spectra file format.

Layout under one root (the original design's folder names)::
    <root>/demo_inputs/                                  # the offline demo's model and data, when used
    <root>/saved_models/preliminary_finetune/{pretrained,finetuned,training_metrics.json}
    <root>/saved_models/split_half/{half-a,half-b}/...  # the split-half noise estimate's two fine-tunes, when used
    <root>/configs/lora_rank_config.json
    <root>/analysis_outputs/svd/plots/{singular_values,cumulative_energy,rank_heatmap}.png
    <root>/analysis_outputs/svd/raw_data/{singular_values.npz,summary.csv,summary.json}
    <root>/analysis_outputs/svd/raw_data/layers/<layer>.safetensors
    <root>/analysis_outputs/fidelity/{fidelity.json,fidelity.png}    # the optional fidelity report
    <root>/train/                                        # the vision-language demo's LoRA training run

Every path of a run comes from ``OutputLayout`` (and, for a comparison, ``evidence.ComparisonLayout``).

A layer file holds one float64 vector of singular values per module (keyed by module name); the file's
metadata holds the layer name, its content fingerprint and per-module facts (energy, shape, method, accuracy,
timing, device) as JSON. Orchestrators pass these paths around, never tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from .._io import atomic_write, atomic_write_bytes
from ..adapter_files import RANK_CONFIG
from ..spectra import Spectrum
from ..spectra.kind import SpectrumKind

__all__ = ["Layout", "OutputLayout", "layer_file_name", "write_layer_file", "write_digested_layer_file",
           "load_layer_spectra", "load_spectra",
           "spectra_files", "layer_file_fingerprint", "load_module_records", "WEIGHT_PREFIX", "SpectrumFacts",
           "LayerFileMetadata"]


@dataclass(frozen=True)
class Layout:
    """Base of the layouts: the folders and files of one run under ``root``, each named by a property."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class OutputLayout(Layout):
    """The folders and files of one analysis run under ``root`` (see the module docstring)."""

    @property
    def demo_inputs_dir(self) -> Path:
        return self.root / "demo_inputs"

    @property
    def finetune_dir(self) -> Path:
        return self.root / "saved_models" / "preliminary_finetune"

    @property
    def split_half_dir(self) -> Path:
        return self.root / "saved_models" / "split_half"

    @property
    def config_path(self) -> Path:
        return self.root / "configs" / RANK_CONFIG

    @property
    def svd_dir(self) -> Path:
        return self.root / "analysis_outputs" / "svd"

    @property
    def plots_dir(self) -> Path:
        return self.svd_dir / "plots"

    @property
    def raw_data_dir(self) -> Path:
        return self.svd_dir / "raw_data"

    #: The analysis plots, by name (``plot_path``).
    PLOTS = ("singular_values", "cumulative_energy", "rank_heatmap")

    def plot_path(self, name: str) -> Path:
        """``plots/<name>.png``, one of ``PLOTS``."""
        if name not in self.PLOTS:
            raise ValueError(f"no plot named {name!r}; the plots are {', '.join(self.PLOTS)}")
        return self.plots_dir / f"{name}.png"

    @property
    def singular_values_path(self) -> Path:
        return self.raw_data_dir / "singular_values.npz"

    @property
    def summary_csv_path(self) -> Path:
        return self.raw_data_dir / "summary.csv"

    @property
    def summary_json_path(self) -> Path:
        return self.raw_data_dir / "summary.json"

    @property
    def fidelity_dir(self) -> Path:
        return self.root / "analysis_outputs" / "fidelity"

    @property
    def fidelity_json_path(self) -> Path:
        return self.fidelity_dir / "fidelity.json"

    @property
    def fidelity_plot_path(self) -> Path:
        return self.fidelity_dir / "fidelity.png"

    @property
    def train_dir(self) -> Path:
        """The vision-language demo's LoRA training run."""
        return self.root / "train"


def layer_file_name(layer: str) -> str:
    """File name for a layer's spectra: ``model.layers.3`` -> ``model.layers.3.safetensors``."""
    return layer.replace("/", "_") + ".safetensors"


LAYER_FILES = "raw_data/layers"  # under the SVD folder: one spectra file per layer
DELTA_FILES = "delta_weights"  # with save_deltas: each layer's deltas (float32)
VECTOR_FILES = "singular_vectors"  # with save_vectors: each module's truncated-SVD factors


def layer_file(svd_dir: str | Path, layer: str, folder: str = LAYER_FILES) -> Path:
    """Path of a layer's file in ``folder`` under the SVD output folder."""
    return Path(svd_dir) / folder / layer_file_name(layer)


def write_layer_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with string ``metadata`` as safetensors, atomically."""
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_digested_layer_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` with ``metadata`` as safetensors, atomically, and return the sha256 of the file's bytes,
    hashed as they are written (the file is never read back: ~1 GB per 7B layer of curvature factors). Holds the
    serialized file in memory once while writing."""
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


WEIGHT_PREFIX = "weight:"  # key prefix of the plain weight spectra beside curvature-weighted ones


@dataclass(frozen=True)
class SpectrumFacts:
    """What a layer file records of one spectrum beside its singular values (JSON in the file's metadata)."""

    total_energy: float
    """||M||_F^2 of the matrix whose spectrum it is (the delta, or the curvature-weighted delta), float64, exact."""
    shape: tuple[int, int]
    """(d_out, d_in) of the delta."""
    method: str
    """The SVD method that produced the values (``Spectrum.method``)."""
    rel_error_bound: float
    """Bound on the relative error of the top values (``Spectrum.rel_error_bound``)."""
    seconds: float
    """Wall time of the computation, in seconds."""
    device: str
    """Where it ran ("cpu", "cuda:0", ...)."""
    power_iters: int
    """Subspace iterations of the randomized method (0 otherwise)."""
    spectrum: SpectrumKind = SpectrumKind.WEIGHT
    """Which spectrum it is (a module asked for a curvature spectrum but never ran on the calibration records
    has its weight spectrum here, and ``fallback`` says why)."""
    fallback: str | None = None
    """Why the spectrum is not the kind the analysis asked for; None when it is."""

    @classmethod
    def of(cls, spectrum: Spectrum, kind: SpectrumKind, fallback: str | None = None) -> SpectrumFacts:
        return cls(spectrum.total_energy, tuple(spectrum.shape), spectrum.method, spectrum.rel_error_bound,
                   spectrum.seconds, spectrum.device, spectrum.power_iters, SpectrumKind(kind), fallback)

    def to_json(self) -> dict:
        """The JSON object of the file format (``fallback`` only when there is one)."""
        record = {**dataclasses.asdict(self), "shape": list(self.shape), "spectrum": self.spectrum.value}
        if self.fallback is None:
            del record["fallback"]
        return record

    @classmethod
    def from_json(cls, record: dict) -> SpectrumFacts:
        """Read back ``to_json``'s object (a file without ``spectrum`` is of the weight spectrum)."""
        return cls(float(record["total_energy"]), tuple(record["shape"]), record["method"],
                   float(record["rel_error_bound"]), float(record["seconds"]), record["device"],
                   int(record["power_iters"]), SpectrumKind(record.get("spectrum", "weight")), record.get("fallback"))

    def with_values(self, singular_values: np.ndarray) -> Spectrum:
        """The ``Spectrum`` these facts describe, given its singular values ((k,) float64)."""
        return Spectrum(singular_values, self.total_energy, self.shape, self.method, self.rel_error_bound,
                        self.seconds, self.device, self.power_iters)


@dataclass(frozen=True)
class LayerFileMetadata:
    """The metadata of a layer file: whose layer, from which weights, and the facts of every spectrum in it."""

    layer: str
    """The layer's name (``ModuleRef.layer``)."""
    fingerprint: str
    """sha256 of the two digests below: the identity of the layer's content in both checkpoints."""
    base_digest: str
    """sha256 of the layer's weights in the base checkpoint."""
    finetuned_digest: str
    """sha256 of the layer's weights in the fine-tuned checkpoint."""
    spectrum: SpectrumKind
    """The spectrum the analysis asked for."""
    modules: dict[str, SpectrumFacts]
    """Module name -> its main spectrum's facts; ``WEIGHT_PREFIX`` + name -> its plain weight spectrum's, beside a
    curvature-weighted main one."""

    def to_strings(self) -> dict[str, str]:
        """safetensors metadata (str -> str)."""
        return {"layer": self.layer, "fingerprint": self.fingerprint, "base_digest": self.base_digest,
                "finetuned_digest": self.finetuned_digest, "spectrum": self.spectrum.value,
                "modules": json.dumps({n: f.to_json() for n, f in self.modules.items()})}

    @classmethod
    def from_strings(cls, metadata: dict[str, str]) -> LayerFileMetadata:
        return cls(metadata.get("layer", ""), metadata.get("fingerprint", ""), metadata.get("base_digest", ""),
                   metadata.get("finetuned_digest", ""), SpectrumKind(metadata.get("spectrum", "weight")),
                   {n: SpectrumFacts.from_json(r) for n, r in json.loads(metadata["modules"]).items()})

    @classmethod
    def read(cls, path: str | Path) -> LayerFileMetadata:
        """The metadata of the layer file at ``path``."""
        with safe_open(str(path), framework="pt") as handle:
            return cls.from_strings(handle.metadata())

    @property
    def main(self) -> dict[str, SpectrumFacts]:
        """Module name -> the facts of its main spectrum (the one its rank is read from)."""
        return {n: f for n, f in self.modules.items() if not n.startswith(WEIGHT_PREFIX)}


def load_layer_spectra(path: str | Path, weight: bool = False) -> dict[str, Spectrum]:
    """Read a layer file written by ``analyze_layer`` back into ``module name -> Spectrum``.

    The main spectra by default (curvature-weighted when the analysis was); ``weight=True`` gives the plain
    spectra of the deltas (the same ones when the analysis used the weight spectrum).
    """
    with safe_open(str(path), framework="pt") as handle:
        facts = LayerFileMetadata.from_strings(handle.metadata()).modules
        out = {}
        for name in (n for n in facts if not n.startswith(WEIGHT_PREFIX)):
            key = WEIGHT_PREFIX + name if weight and WEIGHT_PREFIX + name in facts else name
            out[name] = facts[key].with_values(handle.get_tensor(key).numpy())
    return out


def load_module_records(paths: Iterable[str | Path]) -> dict[str, SpectrumFacts]:
    """Module name -> the facts its layer file records about its main spectrum: shape, energy, method, accuracy,
    timing, ``spectrum`` and ``fallback`` (why another spectrum than asked)."""
    records: dict[str, SpectrumFacts] = {}
    for path in paths:
        records.update(LayerFileMetadata.read(path).main)
    return records


def load_spectra(paths: Iterable[str | Path], weight: bool = False) -> dict[str, Spectrum]:
    """All modules' spectra from layer files (``LayerResult.path``s, or ``spectra_files(svd_dir)``); see
    ``load_layer_spectra`` for ``weight``."""
    spectra: dict[str, Spectrum] = {}
    for path in paths:
        spectra.update(load_layer_spectra(path, weight))
    return spectra


def spectra_files(svd_dir: str | Path) -> list[Path]:
    """The layer files under an SVD output folder (``OutputLayout.svd_dir``), in name order."""
    return sorted((Path(svd_dir) / LAYER_FILES).glob("*.safetensors"))


def layer_file_fingerprint(path: str | Path) -> str | None:
    """The content fingerprint a layer file records, or None if it is missing or unreadable."""
    if not Path(path).is_file():
        return None

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata().get("fingerprint")
    except Exception:  # a damaged file counts as missing: the caller recomputes it
        return None
