"""The configuration reference, generated from the settings model.

``python -m pipeline.config_reference > docs/CONFIGURATION.md`` (``make config-docs``) writes
every ``SLUICE_*`` variable with its type, default and meaning, in the sections of
``pipeline.config.GROUPS``. A unit test fails when the committed file differs from what this
module renders, so the reference cannot fall behind the model.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from pipeline.config import GROUPS, PACKAGE_ROOT, Settings, SettingsGroup

ENV_PREFIX = "SLUICE_"

HEADER = """\
# Configuration reference

<!-- Generated from pipeline/config.py by `python -m pipeline.config_reference`
     (`make config-docs`). Do not edit by hand: a unit test fails when this file differs. -->

Every Sluice process (the stages, the archiver, the gateway, the `sluice` command) reads one
settings model, `pipeline.config.Settings`, from `SLUICE_*` environment variables once, at
start-up; nothing reads the environment later, and the settings cannot change while a process
runs. A variable that is not set takes the default below. Values are parsed by pydantic:
booleans accept `true`/`false` (also `1`/`0`, `yes`/`no`), and a value of the wrong type or
outside its range is refused at start-up with an error that names the setting. Secrets are
never printed: not in logs, not in `repr`.

The stage processes that `sluice demo` and `sluice scale` start get the settings of the command
that started them.
"""

FOOTER = """\
## Read outside the settings model

- `SLUICE_RUN_DIR`: where `sluice up` keeps the handles and data of the local broker and MinIO
  it starts (default `$XDG_CACHE_HOME/sluice/run`, else `~/.cache/sluice/run`). Only the local
  tooling reads it; a deployed service never does.
"""


_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (str, "string"),
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (Path, "path"),
)


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `string`, `integer`, one of `a`, `b`, ..."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in get_args(annotation))
    if annotation is SecretStr:
        return "string (secret)"
    for kind, name in _TYPE_NAMES:
        if annotation is kind:
            return name
    raise TypeError(f"no reference name for the settings type {annotation!r}")


def bounds(field: FieldInfo) -> str:
    """The field's numeric constraints, e.g. `≥ 1`, `0 to 65535`."""
    low = high = ""
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"≥ {item.ge}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {item.gt}"
        elif isinstance(item, annotated_types.Le):
            high = f"≤ {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {item.lt}"
    if low.startswith("≥") and high.startswith("≤"):
        return f"{low[2:]} to {high[2:]}"
    return ", ".join(part for part in (low, high) if part)


def default_text(name: str, value: Any) -> str:
    """How a default reads in the reference; paths inside the installation are shown relative
    to it, so the file does not depend on where Sluice is checked out or installed."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path) and value.is_absolute():
        try:
            return f"`{value.relative_to(PACKAGE_ROOT).as_posix()}` in Sluice's installation"
        except ValueError:
            return f"`{value.as_posix()}`"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if name.endswith("_bytes") and isinstance(value, int) and value % 1024 == 0:
        for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
            if value % size == 0:
                return f"`{value}` ({value // size} {unit})"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(groups: tuple[SettingsGroup, ...] = GROUPS) -> list[tuple[SettingsGroup, list[str]]]:
    """Each group with its fields: from its ``first`` field up to the next group's.

    Raises ValueError when a group names an unknown field, the groups are out of declaration
    order, or the first field is in no group, so a new field cannot fall out of the reference.
    """
    names = list(Settings.model_fields)
    starts = []
    for group in groups:
        if group.first not in names:
            raise ValueError(
                f"settings group {group.title!r} starts at unknown field {group.first}"
            )
        starts.append(names.index(group.first))
    if starts != sorted(starts) or len(set(starts)) != len(starts) or starts[:1] != [0]:
        raise ValueError("settings groups must start at the first field, in declaration order")
    ends = [*starts[1:], len(names)]
    return [(g, names[a:b]) for g, a, b in zip(groups, starts, ends, strict=True)]


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    for group, names in sections():
        out.append(f"## {group.title}\n")
        if group.intro:
            out.append(f"{group.intro}\n")
        out.append("| variable | type | default | meaning |")
        out.append("|---|---|---|---|")
        for name in names:
            field = Settings.model_fields[name]
            if not field.description:
                raise ValueError(f"settings field {name} has no description")
            kind = type_name(field.annotation)
            limits = bounds(field)
            if limits:
                kind = f"{kind}, {limits}"
            out.append(
                f"| `{ENV_PREFIX}{name.upper()}` | {_cell(kind)} | "
                f"{_cell(default_text(name, field.default))} | {_cell(field.description)} |"
            )
        out.append("")
    out.append(FOOTER)
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
