"""Stage 6: adapters that every server reads right.

Per-module ranks reach PEFT through ``rank_pattern`` / ``alpha_pattern``; PEFT honours both, most servers do not
(read from their sources, 2026-11; ``SERVERS`` below): vLLM applies one global scale ``lora_alpha / r`` to every
module, llama.cpp scales each tensor by ``lora_alpha / rank_of_that_tensor``, SGLang, LoRAX and TGI reject ranks
that differ. Two exports are served right everywhere:

- **uniform**: every module zero-padded to one rank R, its own scale folded into B, and one global scale of 1
  (``r = lora_alpha = R``, ``use_rslora = false``, empty patterns). Exact: with A' = [A; 0] (R x d_in) and
  B' = [s_i B, 0] (d_out x R), B'A' = s_i BA (up to one rounding of s_i B in the adapter's dtype).
- **merged**: W + s_i B A written into a copy of the base model (safetensors, sharded like the base).

    report = export_adapter("outputs/train/adapter", "outputs/export", ExportSettings(format="uniform"))
"""

from __future__ import annotations

# PEFT is imported by the merged export alone: the uniform export and the export checks do without it.
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ._io import atomic_folder, atomic_write_json
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_REPORT, PEFT_KEY_PREFIX, PROVENANCE
from .checkpoints import build_meta_model, resolve_model_path
from .errors import list_problems
from .loading import load_model
from .outputs import check_output_dir
from .reports import ExportReport, MergedExportReport, UniformExportReport
from .serving import (
    SERVERS,
    Adapter,
    AdapterError,
    LoRAModule,
    note_serving,
    read_adapter,
    served_scales,
    serving_problems,
    serving_readme,
)
from .settings import SERVING_RANKS, ExportSettings

__all__ = ["check_export", "export_uniform", "export_merged", "export_adapter",
           # an adapter read back and what servers make of it (``serving.py``), here too for existing callers
           "AdapterError", "LoRAModule", "Adapter", "read_adapter", "serving_problems", "serving_readme",
           "served_scales", "note_serving", "SERVERS"]

#: The files of a base model folder a merged model needs besides its weights and config (tokenizer, processor,
#: chat template, generation defaults): copied into the merged folder; nothing else of the base folder is.
_MODEL_SIDE_FILE = re.compile(r"tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|vocab\.json|"
                              r"merges\.txt|added_tokens\.json|chat_template\.(jinja|json)|generation_config\.json|"
                              r"(video_)?preprocessor_config\.json|processor_config\.json")
def _serving_rank(adapter: Adapter, rank: int | None) -> int:
    largest = max(adapter.ranks.values())
    if rank is None:
        fits = [r for r in SERVING_RANKS if r >= largest]
        if not fits:
            raise AdapterError(f"{adapter.folder}: largest module rank {largest} is above every serving rank "
                               f"({SERVING_RANKS[-1]} at most); merge it instead (--format merged)")
        return fits[0]
    if rank < largest:
        name = max(adapter.ranks, key=adapter.ranks.get)
        raise AdapterError(f"--rank {rank} is below the largest module rank {largest} ({name})")
    full = max(min(m.shape) for m in adapter.modules.values())
    if rank > full:
        fits = next(r for r in SERVING_RANKS if r >= largest)
        raise AdapterError(f"--rank {rank} is above the full rank of every module (at most {full}): the padding would "
                           f"be zeros only; the smallest serving rank that fits is {fits} (leave --rank unset)")
    return rank


def export_uniform(adapter_dir: str | Path, out_dir: str | Path, rank: int | None = None, *,
                   overwrite: bool = False) -> UniformExportReport:
    """Write ``adapter_dir`` as a uniform-rank adapter in ``out_dir`` (see the module docstring); returns the report.

    Args:
        rank: the exported rank R (one of ``SERVING_RANKS``, at least the largest module rank); None: the smallest
            serving rank that fits.
        overwrite: replace ``out_dir`` even when it is a folder this tool did not write (never the adapter itself).
    """
    check_output_dir(out_dir, inputs=[("ADAPTER_DIR", adapter_dir)], overwrite=overwrite, folder_output=True)
    adapter = read_adapter(adapter_dir)
    R = _serving_rank(adapter, rank)
    tensors = {}
    for name, m in adapter.modules.items():
        d_out, d_in = m.shape
        a = torch.zeros(R, d_in, dtype=m.lora_A.dtype)
        b = torch.zeros(d_out, R, dtype=m.lora_B.dtype)
        a[: m.rank] = m.lora_A
        b[:, : m.rank] = (m.lora_B.double() * m.scale).to(m.lora_B.dtype)  # the global scale is 1
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    config = {**adapter.config, "r": R, "lora_alpha": R, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    report = UniformExportReport(source=str(adapter.folder), rank=R, source_ranks=adapter.ranks,
                                 source_scales={n: m.scale for n, m in adapter.modules.items()},
                                 bytes_before=adapter.bytes)
    with atomic_folder(out_dir, overwrite=overwrite, content="adapter") as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        report = report.model_copy(update={"bytes_after": (tmp / ADAPTER_WEIGHTS).stat().st_size})
        atomic_write_json(tmp / EXPORT_REPORT, report.to_json())
        atomic_write_json(tmp / PROVENANCE, {**adapter.provenance, "exported_from": str(adapter.folder),
                                             "export": "uniform"})
    return report


def _check_base_shapes(adapter: Adapter, model: torch.nn.Module) -> None:
    """Every adapted module exists in the base model as a linear layer of the adapter's shape."""
    layers = dict(model.named_modules())
    problems = []
    for name, m in adapter.modules.items():
        layer = layers.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            problems.append(f"{name}: not a linear module of the base model")
        elif (layer.out_features, layer.in_features) != m.shape:
            problems.append(f"{name}: adapter is {m.shape[0]}x{m.shape[1]} but the base's weight is "
                            f"{layer.out_features}x{layer.in_features}")
    if len(problems) == len(adapter.modules) and all(p.endswith("not a linear module of the base model") for p in problems):
        raise AdapterError(f"{adapter.folder} does not fit the base model: none of its {len(problems)} modules (e.g. "
                           f"{next(iter(adapter.modules))}) is a linear module of the base; an adapter for another base?")
    if len(problems) == len(adapter.modules):
        raise AdapterError(f"{adapter.folder} does not fit the base model: none of its {len(problems)} modules does (e.g. "
                           f"{problems[0]}); an adapter for another base?")
    if problems:
        raise AdapterError(list_problems(f"{adapter.folder} does not fit the base model (an adapter for another base?)",
                                         problems, limit=5))


def _shard_bytes(base_dir: Path) -> int:
    """The largest shard of the base (so the merged model is sharded like it)."""
    return max(p.stat().st_size for p in base_dir.glob("*.safetensors"))


def _keep_tied_embeddings(model: torch.nn.Module, tied: bool, base_dir: Path) -> None:
    """Keep a tied head tied through the merge. PEFT unties the config when it finds the head and the embedding in
    different storage after merging (seen under some test orders); adapters never touch either, so when their values
    are identical re-tying is exact. Different values would mean the head no longer is the embedding: refused."""
    if not tied:
        return
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight.data_ptr() == embedding.weight.data_ptr():
        model.config.tie_word_embeddings = True
        return
    if not torch.equal(head.weight, embedding.weight):
        raise AdapterError(f"the base {base_dir} ties its output head to its input embedding, but after merging they "
                           "differ; nothing was written")
    head.weight = embedding.weight
    model.config.tie_word_embeddings = True


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
                  trust_remote_code: bool = False, *, overwrite: bool = False) -> MergedExportReport:
    """Merge the adapter into its base (W + s_i B A per module) and write the full model to ``out_dir``.

    The base loads unquantized in its stored dtype (an adapter trained on a 4/8-bit base is merged into the
    full-precision weights that base was quantized from: the report says so); shards are no larger than the base's
    largest; every non-weight file of the base folder (tokenizer, processor, templates) is copied.
    """
    from peft import PeftModel


    start = time.perf_counter()
    check_output_dir(out_dir, inputs=[("ADAPTER_DIR", adapter_dir), ("--base", base)], overwrite=overwrite,
                     folder_output=True, folder_content="model")
    adapter = read_adapter(adapter_dir, weights=False)  # PeftModel.from_pretrained reads the weights below
    base_dir, meta = _meta_base(adapter, base)
    check_output_dir(out_dir, inputs=[("the base", base_dir)], overwrite=overwrite, folder_output=True,
                     folder_content="model")
    _check_base_shapes(adapter, meta)
    model, _ = load_model(base_dir, dtype="auto", trust_remote_code=trust_remote_code)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model = PeftModel.from_pretrained(model, str(adapter.folder)).merge_and_unload()
    _keep_tied_embeddings(model, tied, base_dir)
    quantized = adapter.provenance.get("quantization")
    report = MergedExportReport(
        source=str(adapter.folder), base=str(base_dir), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        bytes_before=adapter.bytes,
        note=(f"trained on a {quantized}-quantized base; merged into the full-precision weights it was quantized "
              "from (outputs differ from the quantized training model by the quantization error)" if quantized else None))
    with atomic_folder(out_dir, overwrite=overwrite, content="model") as tmp:
        model.save_pretrained(str(tmp), max_shard_size=_shard_bytes(base_dir))
        for f in base_dir.iterdir():  # what loads with the model; never the user's other files (notes, logs)
            if f.is_file() and not (tmp / f.name).exists() and _MODEL_SIDE_FILE.fullmatch(f.name):
                shutil.copy2(f, tmp / f.name)
        report = report.model_copy(update={"bytes_after": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
                                           "seconds": time.perf_counter() - start})
        atomic_write_json(tmp / EXPORT_REPORT, report.to_json())
    return report


def check_export(adapter_dir: str | Path, settings: ExportSettings = ExportSettings(),
                 base: str | Path | None = None, out_dir: str | Path | None = None, overwrite: bool = False) -> Adapter:
    """Everything ``export_adapter`` would refuse, checked without writing (the CLI runs it first): the adapter
    folder, the rank (uniform) or the base and its shapes from its config alone (merged), and the output folder
    (when given). Returns the adapter."""
    content = "adapter" if settings.format == "uniform" else "model"
    if out_dir is not None:
        check_output_dir(out_dir, inputs=[("ADAPTER_DIR", adapter_dir), ("--base", base)], overwrite=overwrite,
                         folder_output=True, folder_content=content)
    adapter = read_adapter(adapter_dir, weights=False)
    if settings.format == "uniform":
        _serving_rank(adapter, settings.rank)
    else:
        if settings.rank is not None:
            raise AdapterError(f"--rank {settings.rank} applies to --format uniform only")
        base_dir, meta = _meta_base(adapter, base)
        if out_dir is not None:
            check_output_dir(out_dir, inputs=[("the base", base_dir)], overwrite=overwrite, folder_output=True,
                             folder_content=content)
        _check_base_shapes(adapter, meta)
    return adapter


def _meta_base(adapter: Adapter, base: str | Path | None):
    """(base folder, the base model on the meta device) of an adapter, ``base`` overriding its recorded one."""
    base = base or adapter.config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter.folder}/adapter_config.json names no base model: give --base")
    base_dir = resolve_model_path(base)
    return base_dir, build_meta_model(base_dir)


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, settings: ExportSettings = ExportSettings(),
                   base: str | Path | None = None, trust_remote_code: bool = False, *,
                   overwrite: bool = False) -> ExportReport:
    """``export_uniform`` or ``export_merged`` as ``settings.format`` says (each checks its input and ``out_dir``
    first); returns the report."""
    if settings.format == "merged":
        if settings.rank is not None:
            raise AdapterError(f"--rank {settings.rank} applies to --format uniform only")
        return export_merged(adapter_dir, out_dir, base, trust_remote_code, overwrite=overwrite)
    return export_uniform(adapter_dir, out_dir, settings.rank, overwrite=overwrite)
