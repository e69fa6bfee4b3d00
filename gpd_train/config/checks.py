"""Value checks shared by the configuration and the command lines: numbers in range, devices."""

from __future__ import annotations

import math
from typing import Any

import torch

from gpd_train.errors import ConfigError


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(where: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 note: str = "") -> None:
    """Refuse ``value`` unless it is a finite number (an int with ``integer``) in range.

    The one rule set for the trainer's flags and TOML keys and the sampler's flags.
    """
    def shown(bound: float) -> str:
        return str(bound) if is_int(bound) else f"{bound:g}"

    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {shown(low)}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {shown(high)}")
    text = " and ".join(bounds)
    if not (is_int(value) if integer else (isinstance(value, (int, float))
                                            and not isinstance(value, bool)
                                            and math.isfinite(value))):
        kind = "an int" if integer else "a finite number"
        raise ConfigError(f"{where} must be {kind}{' ' + text if text else ''}{note}, got "
                         f"{value!r}")
    in_range = ((low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))
    if not in_range:
        raise ConfigError(f"{where} must be {text}{note}, got {value!r}")


def check_numbers(where: str, values: Any, **rule: Any) -> None:
    """``check_number`` for each entry of the list ``values`` (named ``where[i]``)."""
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {values!r}")
    for index, value in enumerate(values):
        check_number(f"{where}[{index}]", value, **rule)


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device`` (``auto``: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def check_device(name: str) -> None:
    """``auto`` or a torch device this machine has (cpu, cuda, cuda:N)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"device {name!r} requested, but this machine has {count} CUDA "
                             "device(s); use --device cpu or auto")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
