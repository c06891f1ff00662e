"""The collector options table in docs/metrics.md lists every option of every collector's `Options`
model, with its default, and nothing else: a new option, a renamed one or a changed default fails here
until the table says the same."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stabwatch.collectors import FAMILIES
from stabwatch.collectors.base import CollectorOptions

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(\w+Collector)` \| `(\w+)` \| `([^`]*)` \| (.+) \|$")


def _literal(value: Any) -> str:
    """How the table writes a default: strings in double quotes, everything else as Python writes it."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _table() -> dict[tuple[str, str], str]:
    rows: dict[tuple[str, str], str] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            collector, option, default, meaning = m.groups()
            assert (collector, option) not in rows, f"{collector}.{option} listed twice"
            assert meaning.strip(), f"{collector}.{option} has no meaning"
            rows[(collector, option)] = default
    return rows


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_options_model_belongs_to_a_registered_collector():
    registered = {c.Options for c in FAMILIES.values()}
    models = {m for m in _subclasses(CollectorOptions) if m.__module__.startswith("stabwatch.")}
    assert models <= registered, f"options models of collectors missing from FAMILIES: {models - registered}"


def test_options_table_matches_the_options_models():
    expected = {
        (cls.__name__, name): _literal(field.default)
        for cls in FAMILIES.values()
        for name, field in cls.Options.model_fields.items()
    }
    table = _table()
    assert set(table) == set(expected), (
        f"missing from docs/metrics.md: {sorted(set(expected) - set(table))}; "
        f"not an option: {sorted(set(table) - set(expected))}"
    )
    wrong = {k: (table[k], v) for k, v in expected.items() if table[k] != v}
    assert not wrong, f"defaults in the table differ from the models (table, model): {wrong}"
