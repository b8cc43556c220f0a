"""Configuration building blocks both wings share: units, errors, TOML loading with pydantic,
and the rules over several keys.

Durations are written ``"250ms"``, ``"30s"``, ``"5m"``, ``"12h"``, ``"7d"`` (or a number of
seconds) and sizes ``"64KiB"``, ``"512MiB"``, ``"2GB"`` (or a number of bytes). `load_model`
reports every problem at once, each as ``path: message (got value)``.

A rule over several keys or sections is a `Rule` over the TOML's raw dict, run by
`validated_with_rules` (from the whole configuration's wrap validator) whatever else is wrong:
it reads the values it needs with `valid`, is skipped when one of them is missing or invalid
(that value's own problem is reported instead), and reports each `Problem` at the key to change.
(As pydantic model validators such rules ran only once every field of their model was valid,
stopped at their first failure, and were reported at the section or at "(top level)".)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

__all__ = [
    "SECRET_VALUE",
    "AbsolutePath",
    "Bytes",
    "ConfigError",
    "Delay",
    "Interval",
    "Problem",
    "Room",
    "Rule",
    "Seconds",
    "UnknownValue",
    "load_model",
    "model_problems",
    "parse_model",
    "port_argument",
    "valid",
    "validated_with_rules",
    "written",
]

M = TypeVar("M", bound=BaseModel)

_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_UNITS_B = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if match is None:
            raise ValueError("a duration is a number of seconds or like '250ms', '30s', '7d'")
        return float(match.group(1)) * _UNITS_S[match.group(2)]
    return value


def _size(value: Any) -> Any:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?[bB]|[bB]?)\s*", value)
        if match is None:
            raise ValueError("a size is a number of bytes or like '64KiB', '512MiB', '2GB'")
        return int(match.group(1)) * _UNITS_B[match.group(2).lower()]
    return value


# Finite: TOML has inf and nan, and a ttl of inf failed every commit of its group.
Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0, allow_inf_nan=False)]
Delay = Annotated[float, BeforeValidator(_duration), Field(ge=0, allow_inf_nan=False)]
"""A duration that may be zero (a linger: 0 = do not wait)."""
Interval = Annotated[Seconds, Field(ge=0.1)]
"""The period of a loop or a retry: at least 100 ms (a smaller one made the loop spin)."""
Bytes = Annotated[int, BeforeValidator(_size), Field(gt=0)]
Room = Annotated[int, BeforeValidator(_size), Field(ge=0)]
"""A size that may be zero (a reserve: 0 = none)."""


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        # Each command would resolve it against its own working directory: `edge-agent publish`
        # run elsewhere stored events into a buffer of its own that no agent drains.
        raise ValueError("must be an absolute path")
    return value


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists each as ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the configuration:\n{lines}")
        self.source = source
        self.problems = problems


def parse_model(model: type[M], text: str, source: str = "<config>") -> M:
    """Parse and validate TOML text; raise `ConfigError` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error) for error in exc.errors()]) from None


def load_model(model: type[M], path: Path) -> M:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["not UTF-8 text"]) from None
    return parse_model(model, text, str(path))


def model_problems(model: BaseModel) -> list[str]:
    """``model``'s problems when validated again: one made by ``model_copy(update=...)`` was
    never checked as a whole (its cross-section rules above all)."""
    try:
        type(model).model_validate(model.model_dump())
    except ValidationError as exc:
        return [_describe(error) for error in exc.errors()]
    return []


class Problem(NamedTuple):
    """A broken rule over several keys: ``loc`` is the key to change, ``value`` its value (its
    section's dict when the key is missing: a dict is not shown)."""

    loc: tuple[str | int, ...]
    message: str
    value: object


Rule = Callable[[dict[str, Any]], Iterator[Problem]]
"""A rule over several keys or sections of a configuration's raw dict (not yet validated)."""


class UnknownValue(Exception):
    """A value a rule needs is missing or invalid: the rule is skipped."""


def written(section: object, key: str, default: object = None) -> object:
    """``section[key]`` as written (a dict, a list or a value), else ``default``."""
    if isinstance(section, BaseModel):
        return getattr(section, key, default)
    return section.get(key, default) if isinstance(section, dict) else default


def valid(model: type[BaseModel], section: object, key: str) -> Any:
    """``section[key]`` validated as ``model``'s field ``key`` (its default when absent);
    `UnknownValue` if it is not valid. Only the field's type is checked (with its ``Annotated``
    validators), not the model's ``field_validator``s."""
    if isinstance(section, BaseModel):
        return getattr(section, key)
    field = model.model_fields[key]
    if not isinstance(section, dict) or (key not in section and field.is_required()):
        raise UnknownValue
    if key not in section:
        return field.get_default(call_default_factory=True)
    try:
        return _adapter(model, key).validate_python(section[key])
    except ValidationError:
        raise UnknownValue from None


@functools.cache
def _adapter(model: type[BaseModel], key: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[key].rebuild_annotation())


def validated_with_rules(
    model: type[M], data: Any, handler: ModelWrapValidatorHandler[M], rules: Iterable[Rule]
) -> M:
    """``data`` validated by ``handler`` (a wrap validator's) and checked by ``rules``: every
    problem of both in one `ValidationError`, pydantic's first, each rule's at its key."""
    crossed = [
        InitErrorDetails(
            type="value_error", loc=problem.loc, input=problem.value,
            ctx={"error": ValueError(problem.message)},
        )
        for problem in _broken(data, rules)
    ]  # fmt: skip
    try:
        config = handler(data)
    except ValidationError as exc:
        if not crossed:
            raise
        raise ValidationError.from_exception_data(
            exc.title, [*map(_reraised, exc.errors()), *crossed]
        ) from None
    if crossed:
        raise ValidationError.from_exception_data(model.__name__, crossed)
    return config


def _broken(data: object, rules: Iterable[Rule]) -> list[Problem]:
    if not isinstance(data, dict):
        return []  # a model instance: validated already
    found: list[Problem] = []
    for rule in rules:
        with contextlib.suppress(UnknownValue):
            found.extend(rule(data))
    return found


def _reraised(error: ErrorDetails) -> InitErrorDetails:
    """``error`` as it was (type, path, message, value), to raise again with others."""
    return InitErrorDetails(
        type=PydanticCustomError(error["type"], error["msg"]),
        loc=error["loc"],
        input=error["input"],
    )


SECRET_VALUE = "secret_value"  # noqa: S105 (an error type, not a password)
"""The error type (`pydantic_core.PydanticCustomError`) of a value a problem must not show: a
URL with a password."""


def _describe(error: Any) -> str:
    location = ""
    for part in error["loc"]:
        location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    hidden = ("missing", "extra_forbidden", SECRET_VALUE)
    shown = "" if error["type"] in hidden else f" (got {error['input']!r})"
    if isinstance(error.get("input"), dict):
        shown = ""
    return f"{location or '(top level)'}: {message}{shown}"


def port_argument(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535; a usage error otherwise."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 0 (any free port) to 65535")
    return port
