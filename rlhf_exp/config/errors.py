"""Turn Hydra/OmegaConf composition failures into one- or two-line messages.

Hydra's own messages suggest ``+key=value`` for a misspelled key (which would silently add it) and
print a config search path for a missing option. Users need the bad key, the valid choices and the
fix; these helpers build that from the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from rlhf_exp.config.paths import CONF_DIR, NOT_GROUPS, config_dirs, config_file
from rlhf_exp.config.schema import GROUP_SCHEMAS, PHASE_SCHEMAS


class ConfigError(Exception):
    """A problem with the user's configuration or inputs, reported without a traceback."""


def hub_unreachable(key: str, value: str, exc: BaseException) -> ConfigError:
    """A hub id that cannot be fetched (no network, gated, misspelled): one line and the way out."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ConfigError(f"{key}={value}: cannot load it ({type(exc).__name__}: {first}).\n"
                       f"Point {key} at a local copy, or log in (HF_TOKEN) for gated repos; with a filled cache "
                       "set HF_HUB_OFFLINE=1 to skip the network.")


def group_options(group: str) -> list[str]:
    """Options of a group across every config folder (ours and the user's, see rlhf_exp/config/paths.py)."""
    return sorted({p.stem for folder in config_dirs() for p in (folder / group).glob("*.yaml")})


def config_groups() -> list[str]:
    return sorted({p.name for folder in config_dirs() for p in folder.iterdir()
                   if p.is_dir() and p.name not in NOT_GROUPS and not p.name.startswith((".", "_"))})


def _shown(name: str) -> str:
    """A config file as messages name it: conf/<name>.yaml for ours, the full path for a user's."""
    path = config_file(name)
    return f"conf/{name}.yaml" if path is None or path.is_relative_to(CONF_DIR) else str(path)


def _schema_at(full_key: str, phase_name: str | None):
    """The dataclass that holds the last component of ``full_key`` (None at the root)."""
    from rlhf_exp.config.schema import RunConfig

    parts = full_key.split(".")[:-1]
    schema = RunConfig
    for i, part in enumerate(parts):
        if i == 0 and part == "phase":
            schema = PHASE_SCHEMAS.get(phase_name or "", PHASE_SCHEMAS["sft"])
            continue
        if i == 0 and part in GROUP_SCHEMAS:
            schema = GROUP_SCHEMAS[part]
            continue
        fields = {f.name: f for f in dataclasses.fields(schema)}
        if part not in fields:
            return None
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            return None
        schema = type(default)
    return schema


def _field_names(schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def unknown_key_message(full_key: str, phase_name: str | None) -> str:
    prefix, _, key = full_key.rpartition(".")
    schema = _schema_at(full_key, phase_name)
    if schema is None:
        return f"unknown key '{full_key}'."
    valid = _field_names(schema)
    where = f"phase={phase_name}" if prefix == "phase" else (prefix or "the top level")
    lines = []
    if prefix == "phase":
        owners = [n for n, s in PHASE_SCHEMAS.items() if n != phase_name and key in _field_names(s)]
        if owners:
            lines.append(
                f"'{full_key}' is a setting of phase={'/'.join(owners)}, not of phase={phase_name}: "
                f"drop it, or run phase={owners[0]}."
            )
    if not lines:
        guess = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean '{prefix + '.' if prefix else ''}{guess[0]}'?" if guess else ""
        lines.append(f"unknown key '{full_key}' for {where}.{hint}")
    lines.append(f"Valid keys under {prefix or 'the top level'}: {', '.join(valid)}")
    return "\n".join(lines)


def missing_option_message(text: str) -> str | None:
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if not m:
        return None
    group, option = m.groups()
    options = [o for o in group_options(group) if not o.startswith("base_")]
    return f"{group}={option}: no such option. Valid options for {group}: {', '.join(options)}"


def missing_group_message(text: str) -> str | None:
    m = re.search(r"Could not override '([^']+)'.*?No match in the defaults list", text, re.S)
    if not m:
        return None
    return f"'{m.group(1)}' is not a config group. Config groups: {', '.join(config_groups())}"


def validation_message(full_key: str, msg: str, value_hint: str | None) -> str:
    first = msg.splitlines()[0]
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", first)
    if m:
        value, _, expected = m.groups()
        example = f" e.g. {full_key}={value_hint}" if value_hint is not None else ""
        return f"{full_key}: '{value}' is not a valid {expected.lower()}.{example}"
    m = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    if m:
        return f"{full_key}: '{m.group(1)}' is not a valid choice. Valid choices: {m.group(2)}"
    m = re.match(r"Value '(.*)' is not a valid bool", first)
    if m:
        return f"{full_key}: '{m.group(1)}' is not a valid bool. Use {full_key}=true or {full_key}=false"
    return f"{full_key}: {first}"


def translate(exc: BaseException, phase_name: str | None) -> str:
    """Best one- or two-line explanation of a composition failure."""

    text = str(exc)
    for builder in (missing_option_message, missing_group_message):
        message = builder(text)
        if message:
            return message
    cause = exc.__cause__ or exc
    # a bad key or value inside a YAML file: Hydra wraps it without a cause; the text names the file
    source = re.match(r"In '([^']+)': (\w+) raised while composing config", text)
    where = f"in {_shown(source.group(1))}: " if source else ""
    full_key = getattr(cause, "full_key", None) or _text_field(text, "full_key")
    kind = type(cause).__name__ if cause is not exc or not source else source.group(2)
    if full_key and kind in ("ConfigAttributeError", "ConfigKeyError"):
        return where + unknown_key_message(str(full_key), phase_name)
    if full_key and kind == "ValidationError":
        msg = str(cause.msg) if hasattr(cause, "msg") else text.splitlines()[1]
        if re.search(r"field '[^']*' is not Optional", msg):
            return where + null_message(str(full_key), phase_name)
        return where + validation_message(str(full_key), msg, _example_value(str(full_key), phase_name))
    if "Ambiguous value for argument" in text:
        key = re.search(r"argument '([^']+)'", text)
        return (
            f"{key.group(1) if key else 'an override'}: a comma-separated value is a sweep; add -m (--multirun) "
            "to sweep, or write a list as key=[a,b]."
        )
    return text.splitlines()[0] if text else type(exc).__name__


def _text_field(text: str, name: str) -> str | None:
    m = re.search(rf"^\s*{name}: (\S+)", text, re.M)
    return m.group(1) if m else None


def _example_value(full_key: str, phase_name: str | None) -> str | None:
    schema = _schema_at(full_key, phase_name)
    if schema is None:
        return None
    key = full_key.rpartition(".")[2]
    for f in dataclasses.fields(schema):
        if f.name == key and f.default is not dataclasses.MISSING and f.default is not None:
            default = f.default
            return default.value if hasattr(default, "value") else str(default)
    return None


def _schema_field(full_key: str, phase_name: str | None):
    """The schema's dataclass field for ``full_key`` and its resolved type, or (None, None)."""
    import typing

    schema = _schema_at(full_key, phase_name)
    if schema is None:
        return None, None
    key = full_key.rpartition(".")[2]
    for f in dataclasses.fields(schema):
        if f.name == key:
            try:
                return f, typing.get_type_hints(schema).get(key, f.type)
            except Exception:  # an unresolvable annotation: no type to describe
                return f, None
    return None, None


def _plain(value) -> str:
    """A default as an override writes it: true/false, [a,b], an enum's value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return str(value.value if hasattr(value, "value") else value)


def null_message(full_key: str, phase_name: str | None) -> str:
    """A non-Optional key set to null: what it needs, and its default as the example."""
    import enum
    import typing

    f, kind = _schema_field(full_key, phase_name)
    origin = typing.get_origin(kind) or kind
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        first = dataclasses.fields(kind)[0] if dataclasses.fields(kind) else None
        example = ""
        if first is not None and first.default is not dataclasses.MISSING and first.default is not None:
            example = f", e.g. {full_key}.{first.name}={_plain(first.default)}"
        return (f"{full_key}: null is not allowed; it is a group of settings. Set its keys instead{example}, "
                f"or leave it out for the defaults.")
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        needs = f"one of {', '.join(str(m.value) for m in kind)}"
    else:
        needs = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                 list: "a list", dict: "a mapping"}.get(origin, "a value")
    default = None
    if f is not None:
        if f.default is not dataclasses.MISSING and f.default is not None and f.default != "???":
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
    example = f", e.g. {full_key}={_plain(default)}" if default is not None else ""
    return f"{full_key}: null is not allowed; it needs {needs}{example}."
