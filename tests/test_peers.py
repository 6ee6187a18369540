"""Peer rows (PEFT's LoRA variants and data-driven inits), the compute accounting, exact-match accuracy, the
learning-rate choice and a row's resume: on the demo's tiny model, a few steps each."""

import json
import math
from pathlib import Path

import pytest
import torch

from lora_ranks.config import save_rank_config
from lora_ranks.evidence.accuracy import checkable_records, exact_match, normalize_answer
from lora_ranks.evidence.compute import (
    curvature_flops,
    frozen_training_flops,
    full_training_flops,
    lora_ranks_preparation,
    matmul_parameters,
    model_matmul_parameters,
)
from lora_ranks.evidence.peers import PEERS, PeerError, check_peers
from lora_ranks.evidence.runs import (
    RowEvaluation,
    RowResult,
    RowSpec,
    choose_learning_rates,
    comparison_rows,
    curve_steps,
    next_learning_rates,
    train_row,
)
from lora_ranks.settings import PEER_NAMES, ComparisonSettings, LoRATrainingSettings


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The tiny planted base (2 layers, hidden 64), demo records split in train / eval, a uniform rank-2 config."""
    from lora_ranks.checkpoints import CheckpointPair
    from lora_ranks.evidence.experiment import config_from_ranks, uniform_ranks
    from lora_ranks.synthetic import build_tiny_qwen3, write_synthetic_dataset

    root = tmp_path_factory.mktemp("peers")
    base = build_tiny_qwen3(root / "base")
    data = write_synthetic_dataset(root / "data.jsonl", 6, fmt="mixed")
    lines = Path(data).read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[6:]) + "\n")
    (root / "eval.jsonl").write_text("\n".join(lines[:6]) + "\n")
    modules = CheckpointPair(base, base).modules()
    config = save_rank_config(root / "uniform.json", config_from_ranks(modules, uniform_ranks(modules, 2), 10**6))
    return root, str(base), str(config)


SETTINGS = LoRATrainingSettings(max_steps=3, batch_size=4, learning_rate=3e-3, lora_dropout=0.0, max_length=48,
                                gradient_checkpointing=False)


def _evaluation(root, **kw) -> RowEvaluation:
    return RowEvaluation(str(root / "eval.jsonl"), eval_samples=6, max_length=48, peer_records=8, **kw)


def test_peer_registry_matches_the_settings_choices():
    assert tuple(PEERS) == PEER_NAMES


def test_default_peer_is_peft_loraconfig_as_users_get_it(setting):
    """The peer "default" is PEFT's LoraConfig() at the budget's rank with PEFT's own lora_alpha (8), not the
    uniform config's 2r: bit for bit the cold uniform row of a config whose alpha is 8."""
    from lora_ranks.config import load_rank_config
    from lora_ranks.evidence.experiment import with_alpha_policy
    from lora_ranks.settings import AlphaPolicy

    root, base, config = setting
    alpha8 = save_rank_config(root / "alpha8.json", with_alpha_policy(load_rank_config(config), AlphaPolicy(scale=4)))
    cold = train_row(base, RowSpec("r2-uniform", "cold", 0, str(alpha8)), str(root / "train.jsonl"), root / "cold",
                     SETTINGS, _evaluation(root))
    default = train_row(base, RowSpec("r2-uniform", "default", 0, config), str(root / "train.jsonl"),
                        root / "default", SETTINGS, _evaluation(root))
    assert default.loss == cold.loss and default.trainable_parameters == cold.trainable_parameters
    served = json.loads((root / "default" / "adapter" / "adapter_config.json").read_text())
    assert served["lora_alpha"] == 8 and served["r"] == 2 and not served["alpha_pattern"]
    assert load_rank_config(config).alpha_of(load_rank_config(config).target_modules[0]) == 4  # the config's 2r


@pytest.mark.parametrize("peer", ["pissa", "olora", "corda", "lora-ga"])
def test_base_changing_peers_are_evaluated_as_served(setting, peer):
    """PiSSA, OLoRA, CorDA and LoRA-GA train on moved base weights; the row's loss is that of PEFT's converted
    rank-2r adapter on the original base, which equals the trained model's to float32 round-off."""
    root, base, config = setting
    result = train_row(base, RowSpec("r2-uniform", peer, 0, config), str(root / "train.jsonl"), root / peer,
                       SETTINGS, _evaluation(root))
    assert result.served_rank_factor == 2
    assert result.loss == pytest.approx(result.in_memory_loss, rel=1e-5)
    served = json.loads((root / peer / "adapter" / "adapter_config.json").read_text())
    assert served["r"] == 4 and served["init_lora_weights"] is True  # a plain LoRA of rank 2r
    assert (result.preparation_tokens > 0) == PEERS[peer].needs_data


@pytest.mark.parametrize("peer", ["rslora", "eva", "adalora"])
def test_other_peers_train_and_report_their_parameters(setting, peer):
    root, base, config = setting
    result = train_row(base, RowSpec("r2-uniform", peer, 0, config), str(root / "train.jsonl"), root / peer,
                       SETTINGS, _evaluation(root, curve_points=2, curve_samples=4))
    assert math.isfinite(result.loss) and result.served_rank_factor == 1
    assert [p["step"] for p in result.curve] == [2, 3]
    assert result.curve[-1]["train_flops"] == pytest.approx(result.train_flops)
    if peer == "eva":  # rho 2 redistributes ranks: its own count, reported
        assert result.preparation_tokens > 0 and result.preparation_flops == 2 * result.matmul_parameters * \
            result.preparation_tokens
    if peer == "adalora":  # starts above the target rank, with the singular values E
        from lora_ranks.config import load_rank_config

        assert result.trainable_parameters > 1.5 * load_rank_config(config).trainable_parameters


def test_a_finished_row_is_reused_and_a_changed_one_retrains(setting):
    root, base, config = setting
    spec = RowSpec("r2-uniform", "cold", 1, config)
    first = train_row(base, spec, str(root / "train.jsonl"), root / "resume", SETTINGS, _evaluation(root))
    stamp = (root / "resume" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train_row(base, spec, str(root / "train.jsonl"), root / "resume", SETTINGS, _evaluation(root))
    assert again == first
    assert (root / "resume" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    other = train_row(base, spec, str(root / "train.jsonl"), root / "resume", SETTINGS.replace(learning_rate=1e-3),
                      _evaluation(root))
    assert other.learning_rate == 1e-3 and other.loss != first.loss


def test_compute_formula_on_a_model_with_a_tied_head(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config)
    per_layer = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 24  # q, k + v (1 kv head x 8), o, gate + up + down
    assert matmul_parameters(model) == per_layer + 50 * 16  # the tied head once, the embedding lookup not again
    assert frozen_training_flops(100, 10, 7) == (4 * 100 + 6 * 10) * 7
    for tied in (True, False):  # counted from the saved config alone, without its weights, as from the model
        model = Qwen3ForCausalLM(config.__class__(**{**config.to_dict(), "tie_word_embeddings": tied}))
        model.save_pretrained(tmp_path / f"tied-{tied}")
        assert model_matmul_parameters(tmp_path / f"tied-{tied}") == matmul_parameters(model)
    assert full_training_flops(100, 7) == 6 * 100 * 7
    assert curvature_flops(100, 7, passes=2, kind="fisher", samples=3) == 2 * 2 * 100 * 7 * 4


def test_lora_ranks_preparation_counts_the_finetunes_and_curvature(planted_pair, tmp_path):
    from lora_ranks.analysis import analyze_checkpoints

    config = analyze_checkpoints(*planted_pair, tmp_path / "a")
    metrics = tmp_path / "ft.json"
    metrics.write_text(json.dumps({"tokens": 1000}))
    prep = lora_ranks_preparation(config, 500, [metrics])
    assert prep == {"finetune": 6 * 500 * 1000, "curvature": 0.0, "total": 6 * 500 * 1000}  # a weight analysis
    metrics.write_text(json.dumps({"steps": 3}))  # a fine-tune from before the count: unknown, not zero
    assert lora_ranks_preparation(config, 500, [metrics])["total"] is None


class _Answering(torch.nn.Module):
    """A stand-in model whose greedy decode is a fixed text per prompt (to test the scoring, not a model): the text
    of the first key of ``answers`` that the prompt contains."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, input_ids, **kwargs):
        assert input_ids.shape[0] == 1  # one record at a time by default
        prompt = self.tokenizer.decode(input_ids[0])
        text = next(text for key, text in self.answers.items() if key in prompt)
        answer = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, answer, torch.tensor([[self.tokenizer.eos_token_id]])], dim=1)


def test_exact_match_scores_normalized_answers(setting, tmp_path):
    from transformers import AutoTokenizer

    root, base, _ = setting
    tokenizer = AutoTokenizer.from_pretrained(base)
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Sort the letters.", "input": "cab", "output": "abc"},
        {"instruction": "Reverse it.", "input": "dog", "output": "god"},
        {"text": "plain prose has no answer to check"},
        {"messages": [{"role": "user", "content": "Count the letters of cat."}, {"role": "assistant", "content": "3"}]},
    ]) + "\n")
    records = checkable_records(path, limit=10)
    assert len(records) == 3 and all("text" not in r for r in records)
    model = _Answering(tokenizer, {"cab": " ABC ", "dog": "dog", "Count": "3"})
    scored = exact_match(model, tokenizer, records, max_new_tokens=8)
    assert (scored.correct, scored.n) == (2, 3)
    assert [p.strip() for p in scored.predictions] == [{"abc": "ABC", "god": "dog", "3": "3"}[
        r.get("output") or r["messages"][-1]["content"]] for r in records]
    assert scored.standard_error == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert normalize_answer("  Hello \n World ") == "hello world"


def test_batched_greedy_decoding_gives_each_record_its_own_answer(setting):
    """Prompts of different lengths decoded together (left padding) give the responses each gives alone."""
    from lora_ranks.data import load_records
    from lora_ranks.loading import load_model

    root, base, _ = setting
    model, tokenizer = load_model(base)
    records = [r for r in load_records(root / "train.jsonl") if "output" in r or "messages" in r][:9]
    alone = exact_match(model, tokenizer, records, max_new_tokens=6)
    together = exact_match(model, tokenizer, records, max_new_tokens=6, batch_size=4)
    assert len({len(r.get("instruction", "") + r.get("input", "")) for r in records}) > 1  # lengths differ
    assert together.predictions == alone.predictions and together.correct == alone.correct
    assert all(alone.predictions)  # something was decoded


def test_learning_rate_choice_keeps_the_lowest_mean_validation_loss():
    def trial(label, lr, validation, seed=0, diverged=False):
        return RowResult(label, "cold", seed, lr, "", None if diverged else 1.0, 1, 1, 1, 1.0,
                         validation_loss=None if diverged else validation, diverged=diverged)

    best, record = choose_learning_rates([trial("a", 1e-3, 2.0), trial("a", 1e-2, 1.5), trial("a", 3e-2, 1.7),
                                          trial("b", 1e-3, 1.0), trial("b", 1e-2, 1.0)])
    assert best["a", "cold"] == 1e-2 and best["b", "cold"] == 1e-3  # ties: the lower rate
    assert record["a/cold"]["validation_losses"] == {"0.001": 2.0, "0.01": 1.5, "0.03": 1.7}
    assert not record["a/cold"]["at_edge"] and record["b/cold"]["at_edge"]
    # the mean over the tuning seeds decides; a diverged trial is infinitely bad (recorded as None)
    best, record = choose_learning_rates([trial("a", 1e-3, 1.0, 0), trial("a", 1e-3, 2.0, 1), trial("a", 3e-3, 1.4, 0),
                                          trial("a", 3e-3, 1.4, 1), trial("a", 1e-2, 0.1, 0),
                                          trial("a", 1e-2, 0, 1, diverged=True)])
    assert best["a", "cold"] == 3e-3 and record["a/cold"]["validation_losses"]["0.01"] is None
    assert record["a/cold"]["per_seed"]["0.001"] == {"0": 1.0, "1": 2.0}


def test_a_choice_at_an_edge_extends_the_grid_by_its_spacing():
    def record(losses: dict[float, float]) -> dict:
        trials = [RowResult("r", "warm", 0, lr, "", 1.0, 1, 1, 1, 1.0, validation_loss=v) for lr, v in losses.items()]
        return choose_learning_rates(trials)[1]

    grid = {1e-4: 3.0, 3e-4: 2.5, 1e-3: 2.2, 3e-3: 2.0}
    assert next_learning_rates(record(grid)) == {"r/warm": 9e-3}  # best at the top: 3x above it
    assert next_learning_rates(record({**grid, 9e-3: 2.1})) == {}  # interior now
    assert next_learning_rates(record({1e-4: 1.0, 3e-4: 2.5, 1e-3: 2.2})) == {"r/warm": pytest.approx(3.33333e-5)}
    assert next_learning_rates(record({0.3: 2.0, 0.1: 2.5}), max_rate=0.5) == {}  # not above the largest rate allowed


def test_holm_adjusts_for_the_family_of_comparisons():
    from lora_ranks.evidence.experiment import holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted 0.01, 0.03, 0.04, 0.5: times 4, 3, 2, 1, made non-decreasing
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"only": 0.2}) == {"only": 0.2} and holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}


def test_selected_allocations_keep_uniform_ranks():
    from lora_ranks.evidence.runs import select_configs

    configs = {label: f"{label}.json" for label in ("r2-uniform", "r2-energy", "r2-budget-fisher", "r4-uniform",
                                                    "r4-budget-fisher", "signal")}
    chosen = ComparisonSettings(allocations=("budget-fisher",)).allocations
    assert chosen == ("uniform", "budget-fisher")
    assert list(select_configs(configs, chosen)) == ["r2-uniform", "r2-budget-fisher", "r4-uniform", "r4-budget-fisher"]
    assert select_configs(configs, ()) == configs
    with pytest.raises(ValueError, match="unknown allocation 'fisher'"):
        ComparisonSettings(allocations=("fisher",))


def test_rows_and_curve_steps():
    rows = comparison_rows(["r2-uniform", "r2-budget-fisher", "r4-uniform"], ["warm"], ("default", "pissa"))
    assert rows == [("r2-uniform", "warm"), ("r2-budget-fisher", "warm"), ("r4-uniform", "warm"),
                    ("r2-uniform", "default"), ("r2-uniform", "pissa"), ("r4-uniform", "default"),
                    ("r4-uniform", "pissa")]
    assert curve_steps(30, 3) == {10, 20, 30} and curve_steps(2, 5) == {1, 2} and curve_steps(9, 0) == set()


def test_peers_that_cannot_run_are_refused_naming_why():
    with pytest.raises(PeerError, match="unknown peer 'lora-xs'"):
        check_peers(["lora-xs"], quantization=None)
    with pytest.raises(PeerError, match="'pissa' needs the base weights in full precision"):
        check_peers(["default", "pissa"], quantization="4bit")
    with pytest.raises(PeerError, match="cannot be applied to h.0.attn.c_attn \\(a Conv1D"):
        check_peers(["eva"], quantization=None, module_types={"h.0.attn.c_attn": "Conv1D"})
    with pytest.raises(PeerError, match="'rslora' trains on a float32 base here"):
        check_peers(["rslora"], quantization="8bit")
    check_peers(["default", "rslora"], quantization=None, module_types={"h.0.attn.c_attn": "Conv1D"})
    check_peers(["default"], quantization="4bit")
    with pytest.raises(ValueError, match="unknown peer 'lora-xs'"):
        ComparisonSettings(peers=("lora-xs",))
    with pytest.raises(ValueError, match="every learning rate must be in \\(0, 1\\], got -0.01"):
        ComparisonSettings(learning_rates=(1e-3, -0.01))
    with pytest.raises(ValueError, match="but full_finetune is off"):
        ComparisonSettings(full_learning_rates=(1e-3, 3e-3))
    with pytest.raises(ValueError, match="needs at least 2 values"):
        ComparisonSettings(learning_rates=(1e-3,))
    with pytest.raises(ValueError, match="got 0.0"):
        ComparisonSettings(full_finetune=True, full_learning_rates=(0.0,))


def test_unknown_preparation_is_reported_as_unknown_not_free(setting, tmp_path):
    """A pair fine-tuned elsewhere records no token count: lora-ranks' rows show no preparation FLOPs (None), PEFT's
    default LoRA still 0, and the curves plot leaves out what it cannot place."""
    from lora_ranks.evidence.comparison import ComparisonLayout
    from lora_ranks.evidence.report import comparison_report

    _, _, config = setting

    def run(init, seed, loss):
        return RowResult("uniform", init, seed, 1e-3, "", loss, 10, 100, 50, 1e4,
                         curve=[{"step": 1, "tokens": 50, "train_flops": 1e4, "seconds": 1.0, "loss": loss}])

    report = comparison_report(ComparisonLayout(tmp_path), {"uniform": config},
                               [run("warm", 0, 4.0), run("warm", 1, 4.1), run("cold", 0, 4.5), run("cold", 1, 4.4)],
                               {}, preparation={"finetune": None, "curvature": 0.0, "total": None, "seconds": 1.0})
    rows = {r.init: r for r in report.rows}
    assert rows["warm"].preparation_flops is None and rows["warm"].curve[0].total_flops is None
    assert rows["cold"].preparation_flops == 0.0 and rows["cold"].curve[0].total_flops == 1e4
    assert rows["warm"].vs_default.mean == pytest.approx(-0.4)
    assert (tmp_path / "curves.png").is_file()


def test_rows_built_at_once_draw_the_initialization_they_would_alone(monkeypatch):
    """compare trains rows in threads, which share torch's one random generator: a row seeds it and draws its
    initialization as one step, so two rows built at the same moment draw what each draws alone. Without the lock,
    the second row's seeding lands between the first's seeding and its draw (the pause below), and both differ."""
    import threading
    import time
    import types

    import lora_ranks.evidence.runs as runs
    from lora_ranks.evidence.rows import RowEvaluation, RowSpec

    class Drawn:
        def __init__(self):
            time.sleep(0.2)  # PEFT's build between the seeding and the draw: the other row starts meanwhile
            self.weights = torch.rand(4)

        def to(self, device):
            return self

        def get_nb_trainable_parameters(self):
            return (4, 4)

    monkeypatch.setattr(runs, "load_records", lambda path: [{}] * 4)
    monkeypatch.setattr(runs, "build_peer_model", lambda *a, **k: types.SimpleNamespace(
        model=Drawn(), tokenizer=types.SimpleNamespace(pad_token_id=0)))
    monkeypatch.setattr(runs, "prepare_examples", lambda *a, **k: ([], None, None))
    monkeypatch.setattr(runs, "matmul_parameters", lambda model: 0)
    evaluation = RowEvaluation(eval_data_path="", eval_samples=1, max_length=8)

    def build(seed: int):
        spec = RowSpec(label="r2-uniform", init="default", seed=seed, config_path="")
        settings = LoRATrainingSettings(seed=seed)
        return runs._RowModel.build("base", spec, None, "train.jsonl", settings, evaluation, Path("."))

    alone = {seed: build(seed).model.weights for seed in (0, 1)}
    together: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda s=seed: together.__setitem__(s, build(s).model.weights))
               for seed in (0, 1)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the second starts while the first is inside its build
    for thread in threads:
        thread.join(timeout=30)
    assert not torch.equal(alone[0], alone[1])
    for seed in (0, 1):
        assert torch.equal(together[seed], alone[seed]), seed
