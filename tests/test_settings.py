"""One definition per option: every settings field reaches the command line and a flow, with the same default
and help text, and the flow forms (the Prefect UI) validate with the same rules."""

import argparse

import pytest
from pydantic import ValidationError

from flows.cli import COMMANDS, build_parser
from flows.options import SettingsGroup, flag_for, help_text, settings_from_args
from lora_ranks.settings import SETTINGS_CLASSES, AllocationSettings, FinetuneSettings, LoRATrainingSettings


def _flows():
    from flows.check_config import check_config_flow
    from flows.compare_allocations import compare_allocations
    from flows.export_adapter import export_adapter_flow
    from flows.preliminary_finetune import preliminary_finetune
    from flows.svd_analysis import svd_analysis
    from flows.train_dynamic_lora import train_dynamic_lora_flow

    return [svd_analysis, preliminary_finetune, train_dynamic_lora_flow, compare_allocations, export_adapter_flow,
            check_config_flow]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _cli_options() -> dict[tuple[type, str], list[tuple[str, argparse.Action]]]:
    """(settings class, field) -> [(subcommand, argparse action)] for every generated option."""
    found: dict = {}
    subparsers = _subparsers()
    for command, spec in COMMANDS.items():
        actions = {a.dest: a for a in subparsers[command]._actions}
        for group in spec.groups:
            for name in group.field_names():
                found.setdefault((group.cls, name), []).append((command, actions[f"{group.param}.{name}"], group))
    return found


def _flow_fields() -> dict[tuple[type, str], list[dict]]:
    """(settings class, field) -> [its JSON schema in a flow's parameter schema] for every flow parameter typed
    as a settings class."""
    from prefect.utilities.callables import parameter_schema

    by_name = {cls.__name__: cls for cls in SETTINGS_CLASSES}
    found: dict = {}
    for flow in _flows():
        schema = parameter_schema(flow).model_dump()
        for prop in schema["properties"].values():
            ref = prop.get("$ref", "")
            cls = by_name.get(ref.rsplit("/", 1)[-1])
            if cls is None:
                continue
            for name, field_schema in schema["definitions"][cls.__name__]["properties"].items():
                found.setdefault((cls, name), []).append({**field_schema, "flow": flow.name, "param_default": prop["default"]})
    return found


def test_every_settings_field_reaches_the_cli_and_a_flow_with_one_default_and_help():
    cli, flows = _cli_options(), _flow_fields()
    for cls in SETTINGS_CLASSES:
        for name, field in cls.model_fields.items():
            assert (cls, name) in cli, f"{cls.__name__}.{name} has no command-line option"
            assert (cls, name) in flows, f"{cls.__name__}.{name} is no flow parameter"
            assert field.description, f"{cls.__name__}.{name} has no help text (a docstring under the field)"
            for command, action, group in cli[(cls, name)]:
                assert action.help == help_text(field), (command, name)
                assert action.default is argparse.SUPPRESS  # unset options take the settings' default
                assert flag_for(name, group.prefix) in action.option_strings
            default = field.default if not isinstance(field.default, tuple) else list(field.default)
            for schema in flows[(cls, name)]:
                assert schema["description"] == field.description, (schema["flow"], name)
                assert schema["default"] == default, (schema["flow"], name)
                assert schema["param_default"][name] == default, (schema["flow"], name)  # the flow's default object


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_options_give_the_settings_defaults(command, tmp_path):
    inputs = {"--base": "b", "--finetuned": "f", "--out": str(tmp_path), "--model": "m", "--data": "d",
              "--lora-config": "c", "--config": "c", "ADAPTER_DIR": "a"}
    spec = COMMANDS[command]
    argv = [command] + [x for i in spec.inputs if i.required
                        for x in ((inputs[i.flag],) if i.positional else (i.flag, inputs[i.flag]))]
    args = build_parser().parse_args(argv)
    for group in spec.groups:
        assert settings_from_args(args, group) == group.cls()


def test_options_set_the_fields_they_name():
    argv = ["compare", "--model", "m", "--data", "d", "--out", "o", "--energy", "0.8", "--round-to", "8",
            "--budget", "0.01", "--target-modules", "q_proj", "v_proj", "--finetune-learning-rate", "1e-3",
            "--finetune-max-steps", "7", "--lora-learning-rate", "3e-4", "--lora-quantization", "4bit",
            "--no-lora-gradient-checkpointing", "--seeds", "3", "4", "--fidelity-report", "--alpha-policy", "rslora"]
    args = build_parser().parse_args(argv)
    got = {g.param: settings_from_args(args, g) for g in COMMANDS["compare"].groups}
    assert got["allocation"] == AllocationSettings(energy_threshold=0.8, round_to=8, budget=0.01)
    assert got["analysis"].target_modules == ("q_proj", "v_proj")
    assert got["finetune"] == FinetuneSettings(learning_rate=1e-3, max_steps=7)
    assert got["training"] == LoRATrainingSettings(learning_rate=3e-4, quantization="4bit", gradient_checkpointing=False)
    assert got["comparison"].seeds == (3, 4)
    assert got["fidelity"].fidelity_report and got["alpha"].policy == "rslora"


def test_a_refused_value_names_the_flag_the_value_and_the_range():
    group = SettingsGroup(LoRATrainingSettings, "training", prefix="lora")
    args = argparse.Namespace(**{"training.warmup_ratio": "1.5"})
    with pytest.raises(ValueError, match=r"^--lora-warmup-ratio 1\.5: input should be less than 1$"):
        settings_from_args(args, group)


def test_flow_parameters_validate_with_the_same_rules(tmp_path):
    """What a UI form or `prefect deployment run --param` sends is validated by the same settings class."""
    from flows.svd_analysis import svd_analysis

    with pytest.raises(Exception, match="less than or equal to 1"):
        svd_analysis.validate_parameters({"allocation": {"energy_threshold": 1.5}})
    ok = svd_analysis.validate_parameters({"allocation": {"energy_threshold": 0.5}, "output_dir": str(tmp_path)})
    assert ok["allocation"] == AllocationSettings(energy_threshold=0.5)
    with pytest.raises(ValidationError):
        AllocationSettings(energy_threshold=1.5)


def test_replace_validates_like_construction():
    """``replace`` is a validated copy (``model_copy`` is not): a bad value is refused naming the field, and the
    original is unchanged."""
    settings = FinetuneSettings()
    changed = settings.replace(subset_ratio=1.0, max_samples=7)
    assert (changed.subset_ratio, changed.max_samples, changed.learning_rate) == (1.0, 7, settings.learning_rate)
    assert settings.subset_ratio == FinetuneSettings.model_fields["subset_ratio"].default
    with pytest.raises(ValidationError, match="max_rank"):
        AllocationSettings().replace(min_rank=16, max_rank=8)
    assert AllocationSettings().replace(rank_rule="budget", budget=5e4).budget_mode


def test_a_prefixed_field_that_starts_with_its_prefix_has_one_prefix():
    assert flag_for("lora_dropout", "lora") == "--lora-dropout"
    assert flag_for("max_steps", "lora") == "--lora-max-steps"
    options = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["compare"]._actions}
    assert not any("lora_lora" in o for o in options)
