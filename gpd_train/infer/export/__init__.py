"""Export formats, a registry: each format is one module declaring an ``ExportFormat`` (its
name, the kinds of stage it writes, what it needs of ``--base`` and its writer); the
command line (``gpd_train.infer.export.cli``) does the rest (arguments, destination,
preflight) for every format alike.

A stage is exported as one of three kinds: ``full`` (a stage holding full weights), ``lora``
(a LoRA stage's adapter alone) or ``merged`` (a LoRA stage, ``--merged``: its adapter merged
into the base). A new format is ``register(ExportFormat(...))``; the built-ins
(``diffusers``, ``comfyui``) are registered by name on first use, so importing the registry
loads neither format's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpd_train.errors import ConfigError

FULL, LORA, MERGED = "full", "lora", "merged"  # the kinds of stage a format writes
KINDS = (FULL, LORA, MERGED)
DEFAULT_FORMAT = "diffusers"
# The built-in formats, each a module whose FORMAT is registered on first use (in this order).
BUILTIN_MODULES = ("gpd_train.infer.export.diffusers", "gpd_train.infer.export.comfyui")


@dataclass(frozen=True)
class ExportRequest:
    """What the command line asks of a writer (``--run``, ``--out``, ...), checked."""

    run: str
    out: str
    chain: str
    stage: int | None
    base: str | None
    guidance: float | None
    copy: bool
    overwrite: bool


# (request, kind) -> the line printed after the export: what was written and how to use it.
Writer = Callable[[ExportRequest, str], str]


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    ``needs_base`` maps each kind written with ``--base``'s components to what it writes
    (said when ``--base`` is missing); ``check`` refuses, before any work, options the
    format would not read (e.g. ``--base`` where nothing of it is read).
    """

    name: str
    help: str
    write: Writer
    accepts: tuple[str, ...] = KINDS
    needs_base: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[ExportRequest], None] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.accepts).union(self.needs_base) - set(KINDS)
        if unknown or not self.accepts:
            raise ConfigError(f"export format {self.name!r}: kinds must be among {list(KINDS)}, "
                              f"got accepts={list(self.accepts)}, "
                              f"needs_base={list(self.needs_base)}")


_REGISTRY: dict[str, ExportFormat] = {}


def _builtins() -> dict[str, ExportFormat]:
    """The registry, the built-in formats imported into it on the first call (so they come
    first: ``register`` calls this before adding a format)."""
    if not _REGISTRY:
        for module in BUILTIN_MODULES:
            fmt = importlib.import_module(module).FORMAT
            _REGISTRY[fmt.name] = fmt
    return _REGISTRY


def formats() -> Mapping[str, ExportFormat]:
    """Every registered format by name, the built-ins first."""
    return MappingProxyType(_builtins())


def register(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry; its name must be new."""
    registry = _builtins()
    if fmt.name in registry:
        raise ConfigError(f"export format {fmt.name!r} is already registered")
    registry[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format registered by a plug-in or a test."""
    del _builtins()[name]


def get_format(name: str) -> ExportFormat:
    try:
        return _builtins()[name]
    except KeyError:
        raise ConfigError(f"--format must be one of {list(_builtins())}, got {name!r}") from None
