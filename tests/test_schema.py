"""The experiment file's JSON Schema: generated from the validating model, accepts every example config."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from transferctl.cli import app
from transferctl.config import config_from_dict, json_schema

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
runner = CliRunner()


def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_there_are_example_configs() -> None:
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_is_valid(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(raw)]
    assert errors == []
    config_from_dict(raw)  # and the model agrees


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda raw: raw["backbone"].update(nme="resnet18"), "backbone"),
        (lambda raw: raw.update(strategy="finetune"), "strategy"),
        (lambda raw: raw["data"].update(batch_size=0), "data.batch_size"),
        (lambda raw: raw["data"].pop("root"), "data"),
        (lambda raw: raw.update(device="gpu"), "device"),
        (lambda raw: raw.update(logging={"tensorboard": "sometimes"}), "logging.tensorboard"),
        (lambda raw: raw["schedule"][0].update(epochs=0), "schedule.0.epochs"),
    ],
)
def test_a_wrong_file_fails_the_schema(change, where: str) -> None:  # noqa: ANN001 - a lambda
    raw = yaml.safe_load(CONFIGS[0].read_text(encoding="utf-8"))
    raw.setdefault("schedule", [{"name": "all", "epochs": 1, "lr": 0.1}])
    change(raw)
    errors = list(validator().iter_errors(raw))
    assert errors, "the schema accepted a wrong file"
    assert where in error_paths(errors), [e.message for e in errors]


def error_paths(errors: list[jsonschema.ValidationError]) -> set[str]:
    """Dotted paths of the errors and of those inside them (a list-or-null field nests its reasons)."""
    paths = set()
    for error in errors:
        paths.add(".".join(map(str, error.absolute_path)))
        paths |= error_paths(list(error.context or []))
    return paths


def test_schema_command_prints_the_same_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json_schema()


def test_the_schema_documents_fields_for_editors() -> None:
    schema = json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert "tensorboard" in schema["$defs"]["LoggingConfig"]["properties"]
    assert "description" in schema["properties"]["strategy"]
