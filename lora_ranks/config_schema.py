"""The rank config's schema, written out from ``RankConfig`` for other tools and for the docs.

    python -m lora_ranks.config_schema --json        # the JSON Schema (draft 2020-12) on stdout
    python -m lora_ranks.config_schema --markdown    # the field tables of docs/rank-config.md on stdout
    python -m lora_ranks.config_schema --write       # both into docs/ (the JSON file, the page's generated block)

``tests/test_config.py`` checks that the committed files match what this module generates, so the docs cannot
drift from the model.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from .config import RankConfig

__all__ = ["json_schema", "markdown_tables", "SCHEMA_FILE", "DOC_FILE", "BEGIN", "END"]

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "docs" / "lora_rank_config.schema.json"
DOC_FILE = REPO / "docs" / "rank-config.md"
BEGIN = "<!-- BEGIN GENERATED: python -m lora_ranks.config_schema --markdown -->"
END = "<!-- END GENERATED -->"


def json_schema() -> str:
    """The JSON Schema of ``lora_rank_config.json`` as written (derived fields included), as indented text."""
    schema = RankConfig.model_json_schema(mode="serialization")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "lora_rank_config.json", **schema}
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def _type_name(annotation) -> str:
    """A short readable type: ``int``, ``list[str]``, ``ModuleRecord``, ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin is None:
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):  # its values, as a Literal's
            return " | ".join(json.dumps(m.value) for m in annotation)
        if isinstance(annotation, type):
            return annotation.__name__
        return str(annotation).replace("typing.", "")
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]"


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every model its fields hold, depth first, each once."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    visit(t)
                stack.extend(typing.get_args(t))

    visit(root)
    return seen


def markdown_tables() -> str:
    """One table per model of the config (fields, types, defaults, help texts); derived fields marked."""
    lines: list[str] = []
    for model in _models(RankConfig):
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines += [f"### `{model.__name__}`", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else f"`{_cell(json.dumps(_plain(field.get_default())))}`"
            help_text = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}` | `{_cell(_type_name(field.annotation))}` | {default} | {help_text} |")
        for name, computed in model.model_computed_fields.items():
            help_text = " ".join((computed.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}` | `{_cell(_type_name(computed.return_type))}` | derived | {help_text} (written, "
                         "recomputed on load) |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell (a bare | ends the cell, even in code)."""
    return text.replace("|", "\\|")


def _plain(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def _page_with_tables(page: str) -> str:
    """``page`` with the generated block replaced by today's tables."""
    if BEGIN not in page or END not in page:
        raise ValueError(f"{DOC_FILE} has no generated block ({BEGIN} ... {END})")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{markdown_tables()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ranks.config_schema", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--json", action="store_true", help="print the JSON Schema")
    group.add_argument("--markdown", action="store_true", help="print the field tables")
    group.add_argument("--write", action="store_true", help=f"write {SCHEMA_FILE.name} and the tables of {DOC_FILE.name}")
    args = parser.parse_args(argv)
    if args.json:
        sys.stdout.write(json_schema())
    elif args.markdown:
        sys.stdout.write(markdown_tables())
    else:
        SCHEMA_FILE.parent.mkdir(exist_ok=True)
        SCHEMA_FILE.write_text(json_schema())
        DOC_FILE.write_text(_page_with_tables(DOC_FILE.read_text()))
        print(f"wrote {SCHEMA_FILE} and the tables of {DOC_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
