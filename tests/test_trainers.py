"""lora-ranks' ranks and warm start in the trainers users already run: TRL's SFTTrainer and transformers' Trainer,
through the runnable examples in docs/examples. Each example's model has every module's rank, alpha (PEFT's scaling)
and initial A/B of ``lora-ranks train``'s model, its trainer's loss on a batch equals lora-ranks' on the same batch
(float32, dropout 0: within 1e-5), and it trains two steps."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ranks import lora_config
from lora_ranks.analysis import analyze_checkpoints
from lora_ranks.config import RankConfigError
from lora_ranks.data import collate
from lora_ranks.extract import extract_lora
from lora_ranks.model import lora_ranks_of
from lora_ranks.settings import AllocationSettings, LoRATrainingSettings
from lora_ranks.synthetic import DEMO_BASE, write_synthetic_dataset
from lora_ranks.train import prepare_lora_run

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
SETTINGS = LoRATrainingSettings(lora_dropout=0.0, max_length=64, gradient_checkpointing=False, batch_size=2)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The demo base (with its tokenizer), a fine-tune of it with planted low-rank changes, its rank config, the
    warm start ``lora-ranks extract`` writes, and records."""
    root = tmp_path_factory.mktemp("trainers")
    finetuned = Path(shutil.copytree(DEMO_BASE, root / "finetuned"))
    tensors = load_file(finetuned / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith("proj.weight")]:
        d_out, d_in = tensors[key].shape
        change = torch.randn(d_out, 3, generator=generator) @ torch.randn(3, d_in, generator=generator)
        tensors[key] = tensors[key] + 0.02 * change
    save_file(tensors, str(finetuned / "model.safetensors"), metadata={"format": "pt"})
    analyze_checkpoints(DEMO_BASE, finetuned, root / "run",
                        settings=AllocationSettings(min_rank=2, max_rank=8, smoothing="none"))
    config = root / "run" / "configs" / "lora_rank_config.json"
    extract_lora(DEMO_BASE, finetuned, config, root / "warm")
    data = write_synthetic_dataset(root / "data.jsonl", 4)
    return root, str(config), str(root / "warm"), str(data)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v.detach() for k, v in model.state_dict().items() if "lora_" in k}


def _scalings(model) -> dict[str, float]:
    return {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in model.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}  # LoRA layers only


@pytest.mark.parametrize("example", ["trl_sft", "hf_trainer"])
def test_a_trainer_starts_from_exactly_lora_ranks_initial_model(setting, example, tmp_path):
    root, config, warm, data = setting
    ours = prepare_lora_run(DEMO_BASE, config, data, SETTINGS, init_from=warm, device="cpu")
    trainer = _example(example).build_trainer(str(DEMO_BASE), data, str(tmp_path / "out"), warm_start=warm,
                                              max_steps=2, batch_size=2, max_length=SETTINGS.max_length)
    theirs = trainer.model
    ranks = lora_ranks_of(ours.model)
    assert ranks == lora_ranks_of(theirs) and len(set(ranks.values())) > 1  # per-module ranks, not one global r
    assert _scalings(theirs) == _scalings(ours.model)
    ours_state, theirs_state = _lora_state(ours.model), _lora_state(theirs)
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    assert any(float(v.abs().max()) > 0 for k, v in theirs_state.items() if "lora_B" in k)  # warm: B is not zero
    batch = collate(ours.examples[:2], ours.tokenizer.pad_token_id)
    ours.model.train()
    expected = float(ours.model(**batch).loss)  # what lora-ranks' loop computes for its first step on this batch
    theirs.train()
    got = float(trainer.compute_loss(theirs, dict(batch)))
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (got, expected)
    trainer.train()  # two steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_pefts_init_at_lora_ranks_ranks_through_lora_config(setting, tmp_path):
    """--lora-config: the same ranks and alphas as ``lora-ranks train --init cold``, B = 0 (PEFT's init)."""
    root, config, _, data = setting
    ours = prepare_lora_run(DEMO_BASE, config, data, SETTINGS, device="cpu")
    trainer = _example("trl_sft").build_trainer(str(DEMO_BASE), data, str(tmp_path / "out"), rank_config=config,
                                                max_steps=2, batch_size=2, max_length=SETTINGS.max_length)
    assert lora_ranks_of(trainer.model) == lora_ranks_of(ours.model)
    assert _scalings(trainer.model) == _scalings(ours.model)
    assert all(float(v.abs().max()) == 0 for k, v in _lora_state(trainer.model).items() if "lora_B" in k)
    trainer.train()


def test_lora_config_carries_the_config_and_refuses_another_models(setting, planted_pair):
    _, config, _, _ = setting
    peft_config = lora_config(config, model=str(DEMO_BASE))
    assert peft_config.rank_pattern and peft_config.alpha_pattern and not peft_config.use_rslora
    assert set(peft_config.target_modules) == set(lora_ranks_of(prepare_lora_run(
        DEMO_BASE, config, setting[3], SETTINGS, device="cpu").model))
    with pytest.raises(RankConfigError, match="model"):
        lora_config(config, model=str(planted_pair[0]))  # another model: modules of other shapes, listed



def test_a_warm_start_folder_of_other_ranks_is_refused_in_one_line(setting, tmp_path):
    """The examples take the warm-start folder and the config together: the folder must carry the config's ranks."""
    from lora_ranks import DynamicLoRAError, check_warm_start
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.config import save_rank_config
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks

    _, config, warm, data = setting
    check_warm_start(warm, config)  # extract's folder from this very config
    modules = CheckpointPair(DEMO_BASE, DEMO_BASE).modules()
    other = save_rank_config(tmp_path / "rank1.json", config_from_ranks(
        modules, uniform_ranks(modules, 1), sum(m.shape[0] * m.shape[1] for m in modules)))  # min rank was 2
    with pytest.raises(DynamicLoRAError) as caught:
        check_warm_start(warm, other)
    message = str(caught.value)
    assert "\n" not in message and f"the warm-start folder {warm} does not match {other}" in message
    assert "rank 1" not in message.split(":")[0] and "but the config asks for 1" in message and "more)" in message
    with pytest.raises(SystemExit, match="^error: the warm-start folder .* does not match"):
        _example("trl_sft").build_trainer(str(DEMO_BASE), data, str(tmp_path / "out"), warm_start=warm,
                                          rank_config=str(other))
    assert not (tmp_path / "out").exists()
