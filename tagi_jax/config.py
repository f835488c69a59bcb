"""Loading, overriding and validating run configs (`configs/*.py` files returning an `ml_collections.ConfigDict`).

Launch scripts use `ml_collections.config_flags.DEFINE_config_file` (which already rejects unknown
`--config.key=value` overrides); `load_config(path, overrides)` is the same thing in plain Python for tests
and notebooks. Validation happens at load time, before any work, and every failure is a one-line
`ConfigError` that names the offending key, so a typo costs seconds rather than a queued TPU job.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from ml_collections import config_dict

ConfigDict = config_dict.ConfigDict

_MISSING = object()


class ConfigError(ValueError):
    """A bad config: the message is one line and names the key."""


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------


def load_config(path: str, overrides: Iterable[str] = ()) -> ConfigDict:
    """Load `get_config()` from a config file and apply `key=value` overrides.

    `path` may carry an argument as in `config_flags` (`configs/paper.py:xl` calls `get_config("xl")`).
    Overrides look like `train.steps=10`, `--config.train.steps=10` or `config.train.steps=10`.
    """
    file_path, arg = path, None
    if ":" in os.path.basename(path):
        file_path, arg = path.rsplit(":", 1)
    if not os.path.isfile(file_path):
        raise ConfigError(f"config file not found: {file_path}")
    module_name = "_tagi_config_" + re.sub(r"\W", "_", os.path.abspath(file_path))
    spec = importlib.util.spec_from_file_location(module_name, file_path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {file_path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises, the message names the file
        raise ConfigError(f"config file {file_path} fails to load: {type(e).__name__}: {_first_line(e)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file_path} defines no get_config()")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a size argument it does not take, or does not know
        call = f"get_config({arg!r})" if arg is not None else "get_config()"
        raise ConfigError(f"config file {file_path}: {call} failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(
            f"config file {file_path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    apply_overrides(config, overrides)
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Apply `a.b=value` overrides in place; the value is parsed as the type of the existing field.

    Unknown keys are rejected with the key named (and the keys that do exist at that level).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        for prefix in ("--config.", "config."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        parent, leaf = _parent(config, key)
        if leaf not in parent:
            raise ConfigError(_unknown_key_message(parent, key))
        current = parent[leaf]
        if isinstance(current, ConfigDict):
            raise ConfigError(f"config key '{key}' is a section; override its fields instead")
        value = _parse_value(key, raw, current, parent.get_type(leaf))
        try:
            parent[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key '{key}': cannot set {raw!r} ({e})") from None
    return config


def _parent(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(_unknown_key_message(node, key, ".".join(parts[: i + 1])))
        node = node[part]
    if not isinstance(node, ConfigDict):
        raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[:-1])}' is not a section)")
    return node, parts[-1]


def _unknown_key_message(node: Any, key: str, missing: str | None = None) -> str:
    """`missing` is the first part of `key` that does not exist, when it is not the whole key."""
    known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
    where = f"; known there: {', '.join(known)}" if known else ""
    if missing is not None and missing != key:
        return f"unknown config key '{key}' ('{missing}' does not exist{where})"
    return f"unknown config key '{key}'" + (f" (known there: {', '.join(known)})" if known else "")


def _parse_value(key: str, raw: str, current: Any, declared_type: Any) -> Any:
    """Parse the override string as the type the config already declares for this key."""
    kind = type(current) if current is not None else declared_type
    text = raw.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key '{key}' expects a bool, got {raw!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an int, got {raw!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a float, got {raw!r}") from None
    if kind is str:
        return raw
    if kind in (tuple, list):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (tuple, list)):
            value = [value]
        return kind(value)
    # None without a declared type, or another type: a Python literal, else the raw string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


# --------------------------------------------------------------------------------------------------
# Validation helpers (each raises a one-line ConfigError naming the key)
# --------------------------------------------------------------------------------------------------


def get_key(config: ConfigDict, key: str, default: Any = _MISSING) -> Any:
    """`config["a.b.c"]` by dotted path; a missing key is a ConfigError unless `default` is given."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, ConfigDict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            if default is not _MISSING:
                return default
            raise ConfigError(f"config key '{key}' is missing")
    return node


def require(config: ConfigDict, key: str) -> Any:
    """The value at `key`; missing, None or empty stops with the key named."""
    value = get_key(config, key)
    if value is None or (isinstance(value, (str, tuple, list)) and len(value) == 0):
        raise ConfigError(f"config key '{key}' is required but not set")
    return value


def require_path(config: ConfigDict, key: str, kind: str = "any") -> str:
    """The path at `key`, which must exist (`kind`: "any", "file" or "dir").

    Remote paths (`gs://...`) are checked through `etils.epath` (already an orbax dependency).
    """
    path = str(require(config, key))
    if "://" in path:
        from etils import epath

        p = epath.Path(path)
        exists, is_dir = p.exists(), p.is_dir()
    else:
        p = os.path.expanduser(path)
        exists, is_dir = os.path.exists(p), os.path.isdir(p)
    if not exists:
        raise ConfigError(f"config key '{key}': path does not exist: {path}")
    if kind == "file" and is_dir:
        raise ConfigError(f"config key '{key}': expected a file, got a directory: {path}")
    if kind == "dir" and not is_dir:
        raise ConfigError(f"config key '{key}': expected a directory: {path}")
    return path


def require_choice(config: ConfigDict, key: str, choices: Sequence[Any]) -> Any:
    value = get_key(config, key)
    if value not in choices:
        raise ConfigError(
            f"config key '{key}' is {value!r}; choose one of: {', '.join(map(repr, choices))}"
        )
    return value


def require_int(config: ConfigDict, key: str, minimum: int | None = None) -> int:
    value = get_key(config, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key '{key}' must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value}")
    return value


def require_number(config: ConfigDict, key: str, minimum: float | None = None, strict: bool = False) -> float:
    value = get_key(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        op = ">" if strict else ">="
        raise ConfigError(f"config key '{key}' must be {op} {minimum}, got {value}")
    return float(value)


def require_regex(key: str, pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"config key '{key}' must be a regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config key '{key}': bad regex {pattern!r} ({e})") from None


def rename_sections(message: str, section_names: Mapping[str, str] | None) -> str:
    """Rewrite keys in an error message, e.g. {"train": "stages.finetune.train"} turns 'train.steps' into
    'stages.finetune.train.steps' (for configs whose trainer sections live deeper in the run config)."""
    if not section_names:
        return message
    pattern = r"(?<![\w.])(" + "|".join(re.escape(k) for k in section_names) + r")(?=[.\[])"
    return re.sub(pattern, lambda m: section_names[m.group(1)], message)
