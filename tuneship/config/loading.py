"""Reading a stage's config: a YAML file, TUNESHIP_<KEY> environment variables (serve), --set
KEY=VALUE pairs and command options, layered and validated into the stage's typed model.

User-written configs reject unknown keys and name them (with a close match when there is one);
every problem is collected and reported together, each naming the key and where its value came
from: the file, the environment, or --set.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tuneship.config.schema import ServeConfig
from tuneship.infra.errors import ConfigError

ENV_PREFIX = "TUNESHIP_"
SECRETS = ("api_keys", "key_id_secret")


def from_environment(
    model: type[BaseModel], environ: dict[str, str], prefix: str = ENV_PREFIX
) -> dict[str, Any]:
    """Top-level keys of model set as PREFIX<KEY> variables; numbers and booleans parsed as
    YAML scalars, text fields (paths, hashes, keys) kept as given (a sha256 of digits is not a
    number). Other variables with the prefix (TUNESHIP_HOME, ...) are not the model's."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        raw = environ.get(f"{prefix}{name.upper()}")
        if raw is None:
            continue
        if name in SECRETS or _is_text(field.annotation):
            found[name] = raw if raw.strip() else None
            continue
        try:
            found[name] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            found[name] = raw
        if isinstance(found[name], (dict, list)):
            found[name] = raw
    return found


def _is_text(annotation: Any) -> bool:
    """str, or str | None."""
    return annotation is str or set(typing.get_args(annotation)) == {str, type(None)}


M = TypeVar("M", bound=BaseModel)


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, nested sections flattened."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
            continue
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError("bad --set", [f"'{dotted}': '{key}' is not a section"])
    node[keys[-1]] = value


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--set key.sub=value` pairs; values are parsed as YAML scalars (3, 1e-4, true, [a, b])."""
    data: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set '{pair}': expected KEY=VALUE")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    if problems:
        raise ConfigError("bad --set options", problems)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        ann = next(
            (a for a in getattr(ann, "__args__", ()) if isinstance(a, type)),
            ann,
        )
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _overridden(overrides: dict[str, Any] | None, loc: tuple) -> bool:
    """Whether the value at `loc` (or a section above it) came from --set."""
    node: Any = overrides or {}
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return bool(loc)


def describe_errors(
    model: type[BaseModel],
    exc: ValidationError,
    source: str,
    overrides: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> list[str]:
    """One line per problem, each naming where the value came from: the file, the
    environment, or --set."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        source_of = source
        if _overridden(overrides, err["loc"]):
            source_of = "--set"
        elif _overridden(environment, err["loc"]):
            source_of = f"environment {ENV_PREFIX}{str(err['loc'][0]).upper()}"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{source_of}: unknown key '{key}'{hint} (known: {', '.join(known)})")
        elif err["type"] == "value_error" and not err["loc"]:
            problems.append(f"{source_of}: {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "missing":
            problems.append(f"{source_of}: missing required key '{key}'")
        else:
            problems.append(f"{source_of}: '{key}': {err['msg']} (got {err.get('input')!r})")
    return problems


def load_config(
    model: type[M],
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> M:
    """Read a YAML config (optional), apply the environment's values (see from_environment),
    then --set overrides, validate; raise ConfigError naming where each bad value came from."""
    data: dict[str, Any] = {}
    source = str(path) if path else "--set"
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}", [exc.strerror or str(exc)]) from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"config {path} is not valid YAML", [f"{where}: {exc}"]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}", ["the top level must be a mapping of keys"])
        data = loaded
    if environment:
        data = _merge(data, environment)
    if overrides:
        data = _merge(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = describe_errors(model, exc, source, overrides, environment)
        raise ConfigError(f"invalid {model.__name__}", problems) from None


def load_serve_config(
    path: str | Path | None,
    set_pairs: tuple[str, ...] | list[str] = (),
    options: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServeConfig:
    """The serve settings, layered: defaults, the YAML file, TUNESHIP_<KEY> variables, --set,
    then the command's own options (those given, not None)."""
    given = parse_overrides(set_pairs) | {k: v for k, v in (options or {}).items() if v is not None}
    environment = from_environment(ServeConfig, environ or {})
    return load_config(ServeConfig, path, given, environment)
