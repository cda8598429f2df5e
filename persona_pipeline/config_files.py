"""Finding and reading the YAML configuration files (shipped defaults or an override folder)."""

from __future__ import annotations

import os
from collections.abc import Hashable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """Invalid configuration: the message names the file, the entry and what is wrong."""


def config_file(name: str, config_dir: str | os.PathLike | None = None) -> Path:
    """The override folder's copy of `name` if it has one, else the shipped default."""
    folder = config_dir if config_dir is not None else os.environ.get("PERSONA_CONFIG_DIR")
    if folder:
        candidate = Path(folder).expanduser() / name
        if candidate.is_file():
            return candidate
    return Path(str(resources.files("persona_pipeline.config").joinpath(name)))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark and (mark is None or context_mark.line != mark.line):
            problem += f" ({context} that starts at line {context_mark.line + 1})"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error
    (PyYAML would keep the last one silently)."""


def _unique_key_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
            continue
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable) and key in first_line:
            raise yaml.constructor.ConstructorError(
                problem=f"key {key!r} is given twice in one mapping (first at line {first_line[key]})",
                problem_mark=key_node.start_mark,
            )
        if isinstance(key, Hashable):
            first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_key_mapping)


def describe_validation_error(path: Path, data: dict[str, Any], exc: ValidationError) -> str:
    """One line per problem: file, the entry (by list name, position and key), field, message."""
    lines = []
    errors = exc.errors()
    # A list whose only entry failed also reports "too short": noise next to the real cause.
    nested = {e["loc"][0] for e in errors if len(e["loc"]) > 1}
    errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"][0] in nested)]
    for error in errors:
        loc = list(error["loc"])
        entry = _entry_label(data, loc)
        field = ".".join(str(part) for part in loc[2:]) if entry else ".".join(map(str, loc))
        message = error["msg"].removeprefix("Value error, ")
        where = f"{entry}: {field}" if entry and field else entry or field or "top level"
        lines.append(f"{path}: {where}: {message}")
    return "\n".join(lines)


def _entry_label(data: dict[str, Any], loc: list[Any]) -> str:
    if len(loc) < 2 or not isinstance(loc[1], int):
        return ""
    section, index = loc[0], loc[1]
    items = data.get(section)
    label = f"{section}[{index}]"
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        # A derived metric's `key` is its source: its `name` is what names it.
        name = items[index].get("name") or items[index].get("key") or items[index].get("id")
        if name:
            label += f" ({name!r})"
    return label


def load_validated(name: str, model: type[BaseModel], config_dir: str | os.PathLike | None = None):
    """The file `name` (override folder or shipped default) validated as `model`, and its path.
    Invalid content raises ConfigError naming the file, the entry and the problem."""
    path = config_file(name, config_dir)
    data = read_yaml_mapping(path)
    try:
        return model.model_validate(data), path
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, data, exc)) from None
