"""The chart's README and schema stay in step with values.yaml."""

from __future__ import annotations

import json
import re
from typing import Any, Final

import pytest

from .tools import CHART, read_yaml

README: Final = CHART / "README.md"
VALUE_ROW: Final = re.compile(r"^\| `([\w.*]+)` \| (.*?) \|", re.MULTILINE)


def leaves(values: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of values.yaml (an empty map or a list counts as a leaf)."""
    if isinstance(values, dict) and values:
        return set().union(*(leaves(v, f"{prefix}{k}.") for k, v in values.items()))
    return {prefix.removesuffix(".")}


def documented_keys() -> set[str]:
    """Keys of the README's values table."""
    section = README.read_text(encoding="utf-8").partition("## Values")[2]
    return {key for key, _ in VALUE_ROW.findall(section)}


def covers(row: str, leaf: str) -> bool:
    """Whether a README row documents a values leaf (itself, or a group like `probes.startup.*`)."""
    row = row.removesuffix(".*")
    return leaf == row or leaf.startswith(row + ".")


def test_readme_documents_every_value() -> None:
    """Every key of values.yaml has a row in the README's values table."""
    rows = documented_keys()
    missing = {
        leaf
        for leaf in leaves(read_yaml(CHART / "values.yaml"))
        if not any(covers(r, leaf) for r in rows)
    }
    assert not missing


def test_readme_documents_no_stale_value() -> None:
    """Every row of the README's values table names a key values.yaml still has."""
    all_leaves = leaves(read_yaml(CHART / "values.yaml"))
    stale = {row for row in documented_keys() if not any(covers(row, leaf) for leaf in all_leaves)}
    assert not stale


@pytest.mark.parametrize(
    "key",
    ["mode", "image.tag", "config.shutdownGraceSeconds", "metrics.prometheusRule.local429Ratio"],
)
def test_readme_shows_the_actual_defaults(key: str) -> None:
    """The README's default column agrees with values.yaml for scalar settings."""
    value: Any = read_yaml(CHART / "values.yaml")
    for part in key.split("."):
        value = value[part]
    section = README.read_text(encoding="utf-8").partition("## Values")[2]
    default = dict(VALUE_ROW.findall(section))[key]
    assert default == f"`{value}`"


def test_schema_closes_every_values_object() -> None:
    """Each object of values.yaml that is not passed to Kubernetes as-is rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    definitions = schema["definitions"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict[str, Any], values: Any, path: str) -> None:
        node = resolve(node)
        if not isinstance(values, dict) or node.get("type") != "object":
            return
        if "properties" not in node:  # a Kubernetes object or a string map, passed through
            return
        assert node.get("additionalProperties") is False, f"{path or 'root'} is not closed"
        for key, child in values.items():
            assert key in node["properties"], f"{path}{key} is not in the schema"
            walk(node["properties"][key], child, f"{path}{key}.")

    walk(schema, read_yaml(CHART / "values.yaml"), "")
