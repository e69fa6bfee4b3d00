"""Reading a run's configuration: defaults, then a TOML file, then flags (or a run folder's
config.json), merged first and resolved once into a frozen ``RunConfig``
(gpd_train/config/settings.py holds the keys, their defaults and rules)."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import tomllib

from gpd_train.config.chains import CHAINS
from gpd_train.config.settings import (
    DEFAULT_STEPS,
    PATH_KEYS,
    PER_STAGE,
    RUN_CONFIG,
    DistillConfig,
    EvalConfig,
    ParallelConfig,
    RunConfig,
    Stage0Config,
    default_chain_tables,
)
from gpd_train.errors import ConfigError

_TABLES = {"stage0": Stage0Config, "eval": EvalConfig, "parallel": ParallelConfig}  # and the
# chains' tables (DistillConfig): RunConfig's tables in a TOML file and config.json


def _table_names() -> dict[str, set[str]]:
    """The keys of each table, and under "" the top-level keys (tables included)."""
    names = {key: {f.name for f in dataclasses.fields(kind)} for key, kind in _TABLES.items()}
    chain_keys = {f.name for f in dataclasses.fields(DistillConfig)}
    names.update((chain.section, chain_keys) for chain in CHAINS.values())
    top = {f.name for f in dataclasses.fields(RunConfig) if f.init} - {"chain_tables"}
    return {"": top | set(names), **names}


def _merge(settings: dict[str, Any], values: dict[str, Any]) -> None:
    """``values`` (a TOML document, flags as tables) into ``settings``, table by table;
    unknown keys and tables that are not tables refused."""
    names = _table_names()
    for key, value in values.items():
        if key not in names[""]:
            raise ConfigError(f"unknown key {key!r}; expected one of {sorted(names[''])}")
        if key not in names:
            settings[key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table, got {type(value).__name__}")
        for name in value:
            if name not in names[key]:
                raise ConfigError(f"unknown key {key}.{name!r}; expected one of "
                                 f"{sorted(names[key])}")
        settings.setdefault(key, {}).update(value)


def read_settings(path: str | Path | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values given, before any rule: the TOML file at ``path`` (read once), then
    ``overrides`` ("a.b" keys allowed), as one nested dict of tables (``resolve`` them)."""
    settings: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with path.open("rb") as handle:
            try:
                document = tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        _merge(settings, document)
    nested: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name or key] = value
    _merge(settings, nested)
    return settings


def fit_to_stages(default: list[Any], stages: int) -> list[Any]:
    """A chain's default per-stage list for ``stages`` stages: its first entry for stage 1
    (which absorbs CFG), its last for the last stage (the largest steps), its middle entries
    in between, the last of them repeated (e.g. [2000, 1000, 2000] -> [2000, 1000, 1000,
    2000], [0, 0, 1] -> [0, 1])."""
    if len(default) == stages or stages < 1:
        return list(default) if stages >= 1 else []
    if stages == 1:
        return [default[-1]]
    middle = default[1:-1] or default[:1]
    return [default[0], *(middle[min(k, len(middle) - 1)] for k in range(stages - 2)),
            default[-1]]


def fit_stage_lists(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each chain's per-stage lists that were not given sized to the
    chain's stages, as its defaults would be for them (a schedule that is not a valid list
    is left to the rules to name)."""
    fitted = {key: dict(value) if isinstance(value, dict) else value
              for key, value in settings.items()}
    steps = fitted.get("steps", list(DEFAULT_STEPS))
    for chain in CHAINS.values():
        given = fitted.get(chain.section, {})
        if not isinstance(given, dict):
            continue
        table = dataclasses.replace(DistillConfig(**chain.defaults), **given)
        try:
            stages = chain.schedule.stage_count(steps, table)
        except TypeError:
            continue
        for key in PER_STAGE:
            default = getattr(table, key)
            if key not in given and isinstance(default, list):
                fitted.setdefault(chain.section, {})[key] = fit_to_stages(default, stages)
    return fitted


def resolve(settings: dict[str, Any]) -> RunConfig:
    """The frozen configuration of ``settings`` (from ``read_settings``): defaults filled
    in, unset per-stage lists sized to the schedules, every rule run once (RunConfig's
    ``_resolve``), relative input paths made absolute against the current directory."""
    settings = fit_stage_lists(settings)
    top = {key: value for key, value in settings.items() if key not in _table_names()}
    for key in PATH_KEYS:  # a path that is not a string is left for the rules to name
        if isinstance(top.get(key), str):
            top[key] = os.path.abspath(top[key])
    tables = {key: kind(**settings.get(key, {})) for key, kind in _TABLES.items()}
    chain_tables = {section: dataclasses.replace(table, **settings.get(section, {}))
                    for section, table in default_chain_tables().items()}
    return RunConfig(**top, **tables, chain_tables=chain_tables)


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ("a.b" keys allowed),
    merged first and then resolved once (``resolve``)."""
    return resolve(read_settings(path, overrides))


def load_run_config(folder: str | Path, **overrides: Any) -> RunConfig:
    """The configuration in a run folder's config.json, read from any directory: ``run_dir``
    is ``folder`` (wherever it now is), relative paths are resolved by ``_run_path``, then
    ``overrides`` (e.g. ``device``) apply."""
    folder = Path(folder)
    path = folder / RUN_CONFIG
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    for key in PATH_KEYS:
        if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]):
            raw[key] = _run_path(key, raw[key], folder, raw.get("run_dir"))
    raw.update(overrides, run_dir=str(folder))
    return load_config(None, raw)


def _run_path(key: str, value: str, folder: Path, recorded_run_dir: Any) -> str:
    """The absolute path meant by a relative ``key`` path of ``folder``'s config.json.

    Current files hold paths relative to the run folder; older ones hold them as typed,
    relative to the directory training ran in. Candidates, in order: the run folder, the
    current directory, and that training directory when the folder still ends in its
    recorded relative ``run_dir``. The first that exists is used (the run folder's when
    none does), and a warning names it when another candidate exists too.
    """
    bases = [folder, Path.cwd()]
    if isinstance(recorded_run_dir, str) and not os.path.isabs(recorded_run_dir):
        depth = len(Path(recorded_run_dir).parts)
        absolute = Path(os.path.abspath(folder))
        if depth and absolute.parts[-depth:] == Path(recorded_run_dir).parts:
            bases.append(absolute.parents[depth - 1])
    candidates = list(dict.fromkeys(os.path.abspath(base / value) for base in bases))
    existing = [path for path in candidates if os.path.exists(path)]
    if len(existing) > 1:
        warnings.warn(f"{folder / RUN_CONFIG}: {key} {value!r} is ambiguous; using {existing[0]} "
                      f"(not {', '.join(existing[1:])}); store an absolute path to choose",
                      stacklevel=3)
    return existing[0] if existing else candidates[0]
