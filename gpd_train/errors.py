"""Errors of the trainer and its tools; ``GPDError`` is the family's base (gpd_model.errors)."""

from gpd_model.errors import GPDError


class ConfigError(GPDError, ValueError):
    """An option, flag or TOML key that is missing, malformed or out of range."""


class LoraError(GPDError, ValueError):
    """A LoRA option, adapter file or model that does not fit."""


class SampleError(GPDError, RuntimeError):
    """A sampling or export request that cannot be served (a model, prompt or folder)."""


__all__ = ["ConfigError", "GPDError", "LoraError", "SampleError"]
