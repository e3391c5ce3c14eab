"""Project configuration: `[tool.gradprobe]` in pyproject.toml, or the top level of
gradprobe.toml, or the file named by `--config`.

    [tool.gradprobe]
    select = ["dead-relu", "zero-weights"]     # rules to run (default: all)
    ignore = ["init-scale"]                     # rules to skip
    fail-on = "warning"                         # error | warning | info | never
    input-dtype = "float32"                     # or one per input: ["int64", "int64"]
    [tool.gradprobe.severity]
    vanishing-gradients = "error"
    [tool.gradprobe.thresholds.dead-relu]
    dead_share = 0.7
    [tool.gradprobe.input-shapes]               # first matching glob wins
    "models/vision/**/*.pt" = [[1, 3, 224, 224]]
    "*.ts" = [1, 3, 32, 32]                     # one input: a bare shape is enough

Globs are relative to the directory of the configuration file; a glob without `/` matches the
file name anywhere below it. Flags on the command line override the file key by key. Every
mistake (unknown key, unknown rule or threshold, bad value) is a ConfigError naming the file,
the key and the problem on one line.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.options import DTYPES, DiagnoseOptions
from gradprobe.diagnostics.report import Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_NAMES = ("gradprobe.toml", "pyproject.toml")
FailOn = Literal["error", "warning", "info", "never"]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
# TOML values are typed: "0.5" or true where a number belongs is a mistake, not a conversion.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Shape = list[Int]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class LintConfig(BaseModel):
    """Resolved configuration of one `gradprobe lint` invocation."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True,
                              frozen=True)

    select: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    severity: dict[str, Severity] = Field(default_factory=dict)
    thresholds: dict[str, dict[str, Number]] = Field(default_factory=dict)
    # glob -> one shape per model input, in file order; the first matching glob wins.
    input_shapes: dict[str, list[Shape]] = Field(default_factory=dict)
    input_dtype: list[Dtype] | None = None
    batch_size: Int | None = Field(None, ge=1, le=4096)
    fail_on: FailOn = "error"
    format: str | None = None
    device: Literal["cpu", "cuda", "auto"] | None = None
    seed: Int | None = None

    # Not keys of the file: where it came from, and what only the command line says — shapes
    # for every model (they beat every glob), a real input file, the model format.
    source: Path | None = Field(None, exclude=True)
    root: Path = Field(default_factory=Path.cwd, exclude=True)
    forced_shapes: list[Shape] | None = Field(None, exclude=True)
    input_file: str | None = Field(None, exclude=True)
    model_format: Literal["onnx", "torchscript", "pt2"] | None = Field(None, exclude=True)

    @field_validator("input_dtype", mode="before")
    @classmethod
    def _one_dtype_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("input_shapes", mode="before")
    @classmethod
    def _bare_shape_is_one_input(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {glob: [shapes] if _is_bare_shape(shapes) else shapes
                    for glob, shapes in value.items()}
        return value

    @field_validator("input_shapes", "forced_shapes")
    @classmethod
    def _positive_dims(cls, value: Any) -> Any:
        shapes = value.values() if isinstance(value, dict) else [value or []]
        for group in shapes:
            for shape in group:
                if not shape or any(dim < 1 for dim in shape):
                    raise ValueError(f"shape {shape} needs at least one dimension, each >= 1")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        from gradprobe.client.formats import FORMATS

        if value is not None and value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; choose from {', '.join(FORMATS)}")
        return value

    def shapes_for(self, path: Path) -> list[Shape] | None:
        if self.forced_shapes is not None:
            return self.forced_shapes
        for glob, shapes in self.input_shapes.items():
            if glob_matches(glob, path, self.root):
                return shapes
        return None

    def options_for(self, path: Path) -> DiagnoseOptions:
        """The diagnosis options for one model file: file-wide keys plus its input shapes."""
        values: dict[str, Any] = {
            "input_shapes": self.shapes_for(path),
            "input_dtypes": self.input_dtype,
            "select": self.select,
            "ignore": self.ignore,
            "severities": self.severity,
            "thresholds": self.thresholds,
        }
        for key in ("batch_size", "device", "seed", "input_file"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        if self.model_format is not None:
            values["format"] = self.model_format
        return DiagnoseOptions(**values)

    def with_overrides(self, **overrides: Any) -> LintConfig:
        """A copy where every override that is not None replaces the file's value; field
        names are the snake_case ones (`fail_on`, `input_dtype`, `forced_shapes`, ...)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        unknown = set(given) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"not a configuration field: {sorted(unknown)}")
        if "input_dtype" in given and isinstance(given["input_dtype"], str):
            given["input_dtype"] = [given["input_dtype"]]
        merged = {**self.model_dump(), **self._command_line_only(), **given}
        try:
            config = LintConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"command line: {_first_problem(exc)}") from None
        _check_rules(config, "command line:")
        return config


    def _command_line_only(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, field in type(self).model_fields.items()
                if field.exclude}


# CLI attribute -> configuration field, for flags whose value passes through unchanged.
_FLAGS = {"select": "select", "ignore": "ignore", "fail_on": "fail_on", "format": "format",
          "input_shape": "forced_shapes", "input_dtype": "input_dtype",
          "batch_size": "batch_size", "device": "device", "seed": "seed",
          "input_file": "input_file", "model_format": "model_format"}


def overrides_from_args(args: Any) -> dict[str, Any]:
    """The command-line flags that were given (argparse leaves the others None), as
    `with_overrides` keywords."""
    return {field: getattr(args, flag) for flag, field in _FLAGS.items()
            if getattr(args, flag, None) is not None}


def load_config(explicit: Path | None, start_dir: Path) -> LintConfig:
    """The configuration in force: `explicit` if given, else the nearest gradprobe.toml or
    pyproject.toml with a [tool.gradprobe] table in `start_dir` or above, else defaults."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: configuration file not found")
        table = _read_table(explicit, required=True)
        return _parse(table or {}, explicit)
    for directory in (start_dir.resolve(), *start_dir.resolve().parents):
        for name in CONFIG_NAMES:
            candidate = directory / name
            if candidate.is_file():
                table = _read_table(candidate, required=False)
                if table is not None:
                    return _parse(table, candidate)
    return LintConfig(root=start_dir.resolve())


def glob_matches(glob: str, path: Path, root: Path) -> bool:
    """Match `path` against a glob written relative to `root`: `*` and `?` stay inside one
    directory, `**` spans any number of them, and a glob without `/` matches the file name
    wherever the file is."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        relative = absolute.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        relative = absolute.resolve().as_posix()
    if "/" not in glob.rstrip("/"):
        relative = relative.rsplit("/", 1)[-1]
    glob = glob[2:] if glob.startswith("./") else glob
    return re.fullmatch(_glob_regex(glob), relative) is not None


def _glob_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 2:]:
            end = glob.index("]", i + 2)
            body = glob[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _is_bare_shape(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _read_table(path: Path, *, required: bool) -> dict[str, Any] | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if path.name != "pyproject.toml":
        return data
    table = data.get("tool", {}).get("gradprobe")
    if table is None and required:
        raise ConfigError(f"{path}: has no [tool.gradprobe] table")
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{path}: tool.gradprobe must be a table")
    return table


_FILE_KEYS = [_kebab(name) for name, field in LintConfig.model_fields.items()
              if not field.exclude]


def _parse(table: dict[str, Any], source: Path) -> LintConfig:
    where = f"{source}: [tool.gradprobe]" if source.name == "pyproject.toml" else f"{source}:"
    for key in table:
        if key not in _FILE_KEYS:
            hint = difflib.get_close_matches(_kebab(key), _FILE_KEYS, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where} unknown key '{key}'{suggestion}; "
                              f"known keys: {', '.join(_FILE_KEYS)}")
    try:
        config = LintConfig.model_validate({**table, "source": source,
                                            "root": source.parent.resolve()})
    except ValidationError as exc:
        raise ConfigError(f"{where} {_first_problem(exc)}") from None
    _check_rules(config, where)
    return config


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    parts = [str(part) for part in error["loc"] if not isinstance(part, int)]
    key = ".".join([_kebab(parts[0]), *parts[1:]]) if parts else "value"
    message = error["msg"].removeprefix("Value error, ")
    message = message.replace("Input should be", "must be")
    return f"key '{key}': {message} (got {error.get('input')!r})"


def _known_rules() -> dict[str, dict[str, float]]:
    """Rule name -> its tunable thresholds, from the rule registry."""
    from gradprobe.diagnostics.rules import all_rules

    return {rule.name: dict(rule.defaults) for rule in all_rules()}


def _check_rules(config: LintConfig, where: str) -> None:
    rules = _known_rules()

    def known(name: str, key: str) -> None:
        if name not in rules:
            hint = difflib.get_close_matches(name, rules, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where} key '{key}': unknown rule '{name}'{suggestion}; "
                              f"known rules: {', '.join(rules)}")

    for name in config.select or []:
        known(name, "select")
    for name in config.ignore:
        known(name, "ignore")
    for name in config.severity:
        known(name, "severity")
    for name, values in config.thresholds.items():
        known(name, "thresholds")
        for threshold in values:
            if threshold not in rules[name]:
                raise ConfigError(
                    f"{where} key 'thresholds.{name}': rule {name} has no threshold "
                    f"'{threshold}'; it knows: {', '.join(sorted(rules[name])) or 'none'}")
