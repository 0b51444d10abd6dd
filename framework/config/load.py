"""Reading a run configuration: YAML file + dotted command-line overrides -> a validated `RunConfig`.

Owns: YAML parsing (with floats such as 3e-4 read as numbers, which plain PyYAML reads as strings), `key.path=value`
overrides, turning pydantic's errors into one line naming the key path, and the batch arithmetic that needs the world
size. Everything here runs before any process group or model exists.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from framework.config.schema import RunConfig


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming the file, the key path and the fix."""


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 (PyYAML) wants a dot in floats; YAML 1.2 and every user expect 3e-4 and 1e-6 to be numbers.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    raw = parse_yaml(text, path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, moe, parallel), "
                          f"found {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`train.lr=1e-4` sets raw["train"]["lr"]; the value is read as YAML (numbers, true/false, lists, null)."""
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command-line override {override!r}: expected section.key=value, e.g. train.lr=1e-4")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command-line override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = parse_yaml(value, f"command-line override {override!r}") if value else None


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found (walks nested section models)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    path = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        known = _known_keys(RunConfig, loc)
        return f"{source}: unknown key {path}" + (f"; known keys here: {', '.join(known)}" if known else "")
    if first["type"] == "missing":
        return f"{source}: missing required key {path}"
    msg = first["msg"].removeprefix("Value error, ")
    found = first.get("input")
    where = f"{path}: " if path else ""
    shown = "" if isinstance(found, dict) else f" (found {found!r})"
    more = len(err.errors()) - 1
    return f"{source}: {where}{msg}{shown}" + (f" [+{more} more]" if more else "")


def load_run_config(path: str | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> RunConfig:
    """Validated config from a YAML file (or `base`), with `section.key=value` overrides applied in order."""
    raw = read_yaml(path) if path is not None else dict(base or {})
    source = path or "config"
    for override in overrides:
        apply_override(raw, override)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from None


def gradient_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro batches per optimizer step; the batch sizes must divide evenly over the data-parallel ranks."""
    from framework.config.plan import accumulation_steps  # noqa: PLC0415  (plan imports this module)

    return accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size)
