from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import SecretStr

from pipeline.config import GROUPS, PACKAGE_ROOT, Settings, SettingsGroup
from pipeline.config_reference import default_text, render, sections, type_name
from tests.paths import REPO_ROOT

REFERENCE = REPO_ROOT / "docs" / "CONFIGURATION.md"


def test_the_committed_reference_is_what_the_model_generates() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        "docs/CONFIGURATION.md is stale: regenerate it with `make config-docs`"
    )


def test_every_setting_is_in_the_reference_once_with_a_description() -> None:
    text = render()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert text.count(f"| `SLUICE_{name.upper()}` |") == 1, name


def test_groups_cover_every_field_in_declaration_order() -> None:
    grouped = [name for _, names in sections() for name in names]
    assert grouped == list(Settings.model_fields)
    assert [group.title for group, _ in sections()] == [group.title for group in GROUPS]


def test_a_group_that_names_no_field_or_skips_the_first_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        sections((*GROUPS, SettingsGroup("Gone", "no_such_setting")))
    with pytest.raises(ValueError, match="declaration order"):
        sections(GROUPS[1:])
    with pytest.raises(ValueError, match="declaration order"):
        sections((GROUPS[0], GROUPS[2], GROUPS[1]))


def test_the_reference_does_not_depend_on_where_sluice_lives() -> None:
    text = render()
    assert str(PACKAGE_ROOT) not in text
    assert "`models/demo/cpu-int8` in Sluice's installation" in text


def test_types_and_defaults_read_as_a_user_writes_them() -> None:
    assert type_name(Literal["a", "b"]) == "one of `a`, `b`"
    assert type_name(Path | None) == "path"
    assert type_name(SecretStr | None) == "string (secret)"
    assert type_name(bool) == "boolean"
    assert default_text("archive_max_bytes", 16 * 1024 * 1024) == "`16777216` (16 MiB)"
    assert default_text("max_in_flight", 2048) == "`2048`"
    assert default_text("exactly_once", False) == "`false`"
    assert default_text("ssl_cafile", None) == "unset"
    with pytest.raises(TypeError):
        type_name(list[int])
