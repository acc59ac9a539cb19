"""Typed configs (JSON or YAML): load, apply `--set key=value` overrides, validate with pydantic.

A `.yaml`/`.yml` file holds the same schema as the JSON one (comments allowed); `config_text`
renders a resolved config for `uniter3m config show`.

Every config class is a pydantic model with `extra="forbid"`. A config with several mistakes
raises ONE `ConfigError` that lists every bad key with its dotted path, so a user fixes them
all in one go instead of one per run; a key of an old vocabulary is listed with its new name
(the class's `renamed_key(loc, value)`), among the others.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from uniter3m.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as a dict: JSON, or YAML by suffix (`.yaml`/`.yml`); a missing relative path that
    names a shipped config (`configs/model/tiny.json`) reads the shipped copy."""
    from uniter3m.resources import resolve_config_path

    path = resolve_config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix in YAML_SUFFIXES:
        return _read_yaml(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if path.suffix.lower() != ".json":
            raise ConfigError(
                f"{path}: a {path.suffix or 'suffix-less'} file is not a config uniter3m reads: configs are JSON "
                f"(.json) or YAML ({', '.join(YAML_SUFFIXES)}); write it in one of them"
            ) from err
        raise ConfigError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
    return data


YAML_SUFFIXES = (".yaml", ".yml")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data


def config_text(data: Mapping[str, Any], fmt: str = "json") -> str:
    """A resolved config as JSON (default) or YAML text."""
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(dict(data))), sort_keys=False)
    return json.dumps(data, indent=2)


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """The `--set KEY=VALUE` flag every config-driven command takes (parsed by `apply_overrides`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """`--resume auto|DIR` and `--overwrite`, the same for every command that writes a run folder."""
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|DIR",
        help="'auto': continue from the last complete checkpoint in output_dir (start fresh if none; "
        "fine-tuning keeps the folds that finished); DIR: continue from that checkpoint (fine-tuning: "
        "a checkpoint of the fold given with --fold)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (only a uniter3m run folder)",
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is parsed as JSON when it can be."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=5e-5")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` set (list items by integer index)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_index(part, path, i, len(node))]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict | list):
                    raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, path, len(path) - 1, len(node))] = value
        else:
            node[last] = value
    return data


def _index(part: str, path: list[str], i: int, size: int) -> int:
    if not part.lstrip("-").isdigit() or not -size <= int(part) < size:
        raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not an index of a list of {size}")
    return int(part)


def format_validation_error(
    err: ValidationError,
    source: str,
    renamed: Callable[[tuple[Any, ...], Any], str | None] | None = None,
    schema: type[BaseModel] | None = None,
) -> ConfigError:
    """One ConfigError listing every bad key with its dotted path and what is wrong; `renamed(loc,
    value)` names the new key of an unknown key that is an old name (None: a plain unknown key), also
    beside a required key reported missing (an old name must not hide behind "Field required"), and
    the fix of a value outside a key's choices that is a value of the key's old meaning;
    `schema` (the validated class) lets a misspelt key be answered with the closest known one."""
    lines: dict[str, str] = {}
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        given = e.get("input")
        old_value = renamed(tuple(e["loc"]), given) if renamed and e["type"] == "literal_error" else None
        if e["type"] == "extra_forbidden":
            msg = (renamed and renamed(tuple(e["loc"]), given)) or "unknown key" + closest_key(
                schema, tuple(e["loc"])
            )
        msg = old_value or msg
        if e["type"] == "missing" and renamed and isinstance(given, Mapping):
            for key, value in given.items():
                old = (*e["loc"][:-1], key)
                line = renamed(old, value)
                if line:
                    lines.setdefault(".".join(map(str, old)), f"  {'.'.join(map(str, old))}: {line}")
        shown = (
            ""
            if old_value or e["type"] in {"missing", "extra_forbidden"} or isinstance(given, dict)
            else f" (got {given!r})"
        )
        lines.setdefault(loc, f"  {loc}: {msg}{shown}")
    return ConfigError(f"{source}: {len(lines)} bad key(s):\n" + "\n".join(lines.values()))


def closest_key(schema: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """'; did you mean X?' for an unknown key at `loc`: the closest key of its own section, else the
    section elsewhere that has a key of that name; '(check its spelling)' when nothing is close."""
    import difflib

    if schema is None:
        return " (check its spelling)"
    section = _section(schema, loc[:-1])
    name = str(loc[-1])
    if section is not None:
        close = difflib.get_close_matches(name, list(section.model_fields), n=1, cutoff=0.6)
        if close:
            return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?"
    elsewhere = [path for path in _key_paths(schema) if path[-1] == name]
    if elsewhere:
        return f"; did you mean {'.'.join(elsewhere[0])}? (it belongs in another section)"
    return " (check its spelling)"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds (itself, a dict's values, a list's items, a union's arms)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        return _models_in(args[1])
    return [m for a in args for m in _models_in(a)]


def _section(schema: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = schema
    for part in path:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:  # a dict's key (datasets.NAME): the section is the dict's value
            continue
        found = _models_in(field.annotation)
        model = found[0] if found else None
    return model


def _key_paths(schema: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (section..., key) path of the schema, shallow ones first."""
    paths = [(*prefix, name) for name in schema.model_fields]
    for name, field in schema.model_fields.items():
        for sub in _models_in(field.annotation)[:1]:
            if len(prefix) < 3:
                paths += _key_paths(sub, (*prefix, name))
    return paths


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
    context: Mapping[str, Any] | None = None,
) -> T:
    """Read (a path or a dict), apply overrides, validate (with pydantic's validation `context`);
    raises one ConfigError for all problems."""
    if isinstance(source, Mapping):
        data, name = dict(source), f"{cls.__name__} config"
    else:
        data, name = read_json(source), str(source)
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as err:
        raise format_validation_error(err, name, getattr(cls, "renamed_key", None), cls) from None
