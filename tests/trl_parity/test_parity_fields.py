"""Every field of TRL's GRPOConfig is listed in grpo.trl_fields (honoured, ignored or refused), with TRL's default,
and docs/trl_fields.md is what `grpo trl-fields` writes from that table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trl

from grpo import GRPOConfig, cli, trl_fields

DOC = Path(__file__).parents[2] / "docs" / "trl_fields.md"


def trl_defaults() -> dict[str, object]:
    """TRL's GRPOConfig fields and their defaults (transformers' TrainingArguments included)."""
    fields = {f.name: f for f in dataclasses.fields(trl.GRPOConfig) if f.init}
    return {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for name, f in fields.items()}


def listed() -> set[str]:
    return {*trl_fields.HONOURED_FIELDS, *trl_fields.IGNORED_FIELDS, *trl_fields.REFUSED_FIELDS}


def test_every_trl_field_is_listed():
    missing = sorted(set(trl_defaults()) - listed())
    assert not missing, f"TRL {trl.__version__} has fields grpo.trl_fields does not list: {missing}"


def test_every_listed_field_is_trls_and_listed_once():
    assert not sorted(listed() - set(trl_defaults())), "trl_fields lists names TRL does not have"
    tables = [trl_fields.HONOURED_FIELDS, trl_fields.IGNORED_FIELDS, trl_fields.REFUSED_FIELDS]
    assert sum(map(len, tables)) == len(listed())
    assert not set(trl_fields.REMOVED_FIELDS) & set(trl_defaults())


def test_honoured_fields_are_declared_and_the_others_keep_trls_default():
    declared = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(trl_fields.HONOURED_FIELDS) <= declared
    defaults, config = trl_defaults(), GRPOConfig()
    for name, (default, _) in {**trl_fields.IGNORED_FIELDS, **trl_fields.REFUSED_FIELDS}.items():
        assert default == defaults[name], f"{name}: TRL's default is {defaults[name]!r}, the table says {default!r}"
        assert getattr(config, name) == default


def test_the_document_is_generated_from_the_table(capsys):
    assert cli.main(["trl-fields"]) == 0
    written = capsys.readouterr().out
    assert written == trl_fields.render_markdown()
    assert DOC.read_text(encoding="utf-8") == written, (
        "docs/trl_fields.md is stale: run `grpo trl-fields > docs/trl_fields.md`")
    for name in trl_defaults():
        assert f"| `{name}` | {trl_fields.status(name)[0]} |" in written
