"""LoRA distillation: one frozen base, the stage teacher and the student as adapters on it.

With ``lora_rank`` R the distillation stages of a chain do not copy the model. The base (the
run's stage 0) is loaded once and frozen, and peft puts LoRA adapters on its attention and
FFN projections: ``teacher``, the previous stage's adapter (frozen; absent in stage 1,
whose teacher is the base itself), and ``student``, initialised from it (stage 1: peft's
zero B, so every student starts exactly as its teacher). The stage teacher's forwards run
inside ``use_adapter`` (gpd_train.train.objectives.AdapterDenoiser); the student's are the model's
own. Memory: one copy of the base plus ``2 x R x (in + out)`` values per adapted
projection, instead of a second model, an EMA and Adam state of the full size.

A LoRA stage's output (``model.safetensors``) holds the student adapter's EMA under peft's
key names without the adapter name (``blocks.0.self_attn.qkv.lora_A.weight``, [R, in];
``lora_B`` [out, R]) and, in its metadata, the spec (``lora``). Sampling, evaluation and
export merge ``W + alpha / R * B A`` into a plain WanDiT (``merge_adapter``).

In a chain with a guidance stage, the guidance input (``gpd_model.guidance``) is part of
the adapter: trained in full, in fp32, and switched with it (``use_adapter``'s
``guidance_embedding``: the stage teacher's own, or none for the guidance stage's T0).

Diffusers keeps q, k, v (and the cross-attention's k, v) as separate projections where we
fuse them; a fused LoRA splits exactly: every part shares A, and B splits by rows
(``split_lora``), which each export format (gpd_train.infer.export) lays out in its own
keys.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpd_model import CheckpointError, add_guidance_input, has_guidance_input
from gpd_model.checkpoint import key_map
from gpd_train.config.settings import LoraSpec
from gpd_train.errors import LoraError
from gpd_train.run.experts import EXPERTS, split_experts
from gpd_train.run.files import signature_differences, signature_mismatch

# Our projection names inside a block (their diffusers names: gpd_model.checkpoint.key_map).
TEACHER = "teacher"
STUDENT = "student"
BASE = "base"  # use_adapter(model, BASE): the base model, every adapter switched off
METADATA_KEY = "lora"  # a stage output's metadata entry holding the spec (JSON)
# A w-conditioned LoRA stage (the guidance stage and after) trains its guidance input in
# full (gpd_model.guidance: a small MLP) beside the adapter; its output carries both.
GUIDANCE_PREFIX = "guidance_embedding."
_FACTORS = ("lora_A", "lora_B")


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError("LoRA training and export use peft, which is not installed: "
                        "pip install peft (or pip install -e '.[lora]')") from None
    return peft


def _target_pattern(targets: tuple[str, ...]) -> str:
    """A regex peft full-matches against module names: the targets inside every block."""
    return r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + ")"


def adapted_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Names of the model's projections ``spec`` adapts (blocks.<i>.<target>), in order."""
    pattern = re.compile(_target_pattern(spec.targets))
    return [name for name, module in model.named_modules()
            if pattern.fullmatch(name) and isinstance(module, nn.Linear)]


def adapter_shapes(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """The adapter tensors' names and shapes for a plain WanDiT (the output's layout)."""
    shapes = {}
    for name in adapted_modules(model, spec):
        linear = model.get_submodule(name)
        shapes[f"{name}.lora_A.weight"] = (spec.rank, linear.in_features)
        shapes[f"{name}.lora_B.weight"] = (linear.out_features, spec.rank)
    return shapes


def split_guidance(adapter: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LoRA tensors, the guidance input's) of an adapter, the latter without prefix."""
    lora = {k: v for k, v in adapter.items() if not k.startswith(GUIDANCE_PREFIX)}
    guidance = {k.removeprefix(GUIDANCE_PREFIX): v for k, v in adapter.items()
                if k.startswith(GUIDANCE_PREFIX)}
    return lora, guidance


def check_adapter(adapter: dict[str, torch.Tensor], model: nn.Module, spec: LoraSpec,
                  source: Path | str) -> None:
    """Refuse an adapter whose keys or shapes do not fit ``model`` under ``spec`` (its
    guidance-input tensors, if any, are checked where they are loaded)."""
    adapter, _ = split_guidance(adapter)
    problem = signature_mismatch(
        {key: (shape,) for key, shape in adapter_shapes(model, spec).items()},
        {key: (tuple(value.shape),) for key, value in adapter.items()})
    if problem is not None:
        raise CheckpointError(
            f"LoRA adapter {source} does not fit the model (rank {spec.rank}, targets "
            f"{list(spec.targets)}); nothing was loaded.\n{problem}")


def expert_adapters(joined: dict[str, torch.Tensor], model: nn.Module, spec: LoraSpec,
                    source: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(high, low) adapters of a LoRA pair stage's output ``joined`` (gpd_train.run.experts'
    prefixes), each checked to fit ``model`` (either expert: they share one shape) under
    ``spec``; a misfit is refused in one line naming the expert."""
    adapters = split_experts(joined, source)
    expected = {key: (shape,) for key, shape in adapter_shapes(model, spec).items()}
    for name, adapter in zip(EXPERTS, adapters, strict=True):
        lora = split_guidance(adapter)[0]
        missing, unexpected, mismatched = signature_differences(
            expected, {key: (tuple(value.shape),) for key, value in lora.items()})
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"{source}: the {name} expert's LoRA adapter does not fit the model (rank "
                f"{spec.rank}, targets {list(spec.targets)}): {len(missing)} key(s) missing "
                f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}), "
                f"{len(mismatched)} of another shape (e.g. {mismatched[:1]})")
    return adapters


def _param_name(key: str, adapter: str) -> str:
    """'x.lora_A.weight' -> peft's parameter name 'x.lora_A.<adapter>.weight'."""
    module, factor, leaf = key.rsplit(".", 2)
    return f"{module}.{factor}.{adapter}.{leaf}"


def adapter_from_params(state: dict[str, torch.Tensor], adapter: str = STUDENT
                        ) -> dict[str, torch.Tensor]:
    """The output layout of ``adapter``'s tensors in ``state`` (peft parameter names), with
    the guidance input's tensors as they are."""
    out = {k: v for k, v in state.items() if k.startswith(GUIDANCE_PREFIX)}
    for key, value in state.items():
        for factor in _FACTORS:
            marker = f".{factor}.{adapter}."
            if marker in key:
                out[key.replace(marker, f".{factor}.")] = value
    return out


def attach_adapters(model: nn.Module, spec: LoraSpec,
                    teacher: dict[str, torch.Tensor] | None) -> nn.Module:
    """Freeze ``model`` (the base) and give it a trainable ``student`` adapter; with
    ``teacher`` (the previous stage's adapter) also a frozen ``teacher`` adapter, both
    starting from it. Returns the model, whose forward is the student's."""
    peft = _peft()
    model.requires_grad_(False)
    teacher = None if teacher is None else split_guidance(teacher)[0]
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha,
                             target_modules=_target_pattern(spec.targets))
    names = [TEACHER, STUDENT] if teacher is not None else [STUDENT]
    if teacher is not None:
        check_adapter(teacher, model, spec, "the stage teacher's adapter")
    with _quiet_multiple_adapters():
        for name in names:
            peft.inject_adapter_in_model(config, model, adapter_name=name)
    for layer in lora_layers(model):  # trained in fp32 even on a bf16 base (peft casts back)
        dtype = torch.promote_types(layer.get_base_layer().weight.dtype, torch.float32)
        layer.lora_A.to(dtype)
        layer.lora_B.to(dtype)
    for name in names:
        set_adapter_weights(model, name, teacher or {})
    for layer in lora_layers(model):
        layer.set_adapter(STUDENT)  # the student is the model's default forward
    for key, param in model.named_parameters():
        param.requires_grad_(any(f".{factor}.{STUDENT}." in key for factor in _FACTORS))
    return model


@torch.no_grad()
def set_adapter_weights(model: nn.Module, name: str, adapter: dict[str, torch.Tensor]) -> None:
    """Copy ``adapter`` (the output layout, checked by ``check_adapter``) into the attached
    adapter ``name``'s parameters."""
    params = dict(model.named_parameters())
    for key, value in adapter.items():
        params[_param_name(key, name)].copy_(value)


@dataclass
class LoraStage:
    """A LoRA stage's one model and how its stage teacher runs on it: as base + ``adapter``
    (TEACHER, or BASE for the base alone) with ``guidance_embedding`` as its guidance input
    (None: none)."""

    model: nn.Module
    adapter: str
    guidance_embedding: nn.Module | None


def lora_stage_model(base: nn.Module, spec: LoraSpec, teacher: dict[str, torch.Tensor] | None,
                     precision: str = "fp32", guidance_input: bool = False,
                     device: torch.device | None = None) -> LoraStage:
    """The one model of a LoRA stage, on ``device``, and its stage teacher's view of it.

    ``base`` becomes the frozen base (in bf16 when ``precision`` is bf16: a frozen tensor
    needs no fp32 master copy, which halves the largest allocation; the adapters stay fp32);
    see ``attach_adapters`` for ``teacher``. With ``guidance_input`` the student takes w as an
    input: initialised from the teacher's (its adapter's guidance tensors), or zero (the
    guidance stage, whose teacher is the base alone); trained in full, in fp32.
    """
    if precision == "bf16":
        base = base.to(torch.bfloat16)
    model = attach_adapters(base, spec, teacher)
    teacher_guidance = split_guidance(teacher)[1] if teacher is not None else {}
    if teacher_guidance and not guidance_input:
        raise LoraError("the stage teacher's adapter carries a guidance input, the student "
                        "would not: a chain keeps w as an input once it has one")
    frozen = None
    if guidance_input:
        add_guidance_input(model).guidance_embedding.float()
        if teacher_guidance:
            model.guidance_embedding.load_state_dict(teacher_guidance, strict=True)
            frozen = copy.deepcopy(model.guidance_embedding).requires_grad_(False)
    model = model.to(device) if device is not None else model
    frozen = frozen.to(device) if frozen is not None and device is not None else frozen
    return LoraStage(model, BASE if teacher is None else TEACHER, frozen)


@contextlib.contextmanager
def _quiet_multiple_adapters() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():  # two adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        yield


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: str,
                guidance_embedding: nn.Module | None = None) -> Iterator[None]:
    """Run ``model`` as base + ``adapter`` (BASE: the base alone), with
    ``guidance_embedding`` as its guidance input (None: none), inside the block.

    peft's switches also set the adapters' requires_grad; the flags are restored after,
    so the optimizer and gradient clipping keep seeing the student's adapter only.
    """
    layers = lora_layers(model)
    present = list(layers[0].lora_A) if layers else []
    if adapter != BASE and adapter not in present:
        raise LoraError(f"the model has no LoRA adapter {adapter!r} (it has {present})")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    active = layers[0].active_adapters
    own_guidance = getattr(model, "guidance_embedding", None)
    try:
        model.guidance_embedding = guidance_embedding
        for layer in layers:
            if adapter == BASE:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(adapter)
        yield
    finally:
        model.guidance_embedding = own_guidance
        for layer in layers:
            layer.enable_adapters(True)
            layer.set_adapter(active)
        for param, flag in flags:
            param.requires_grad_(flag)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], spec: LoraSpec,
                  source: Path | str) -> nn.Module:
    """``W += alpha / R * B A`` for every adapted projection of the plain ``model``, in place
    (the product in float64, rounded once to W's dtype), and the adapter's guidance input
    given to it, if it has one; returns the model."""
    check_adapter(adapter, model, spec, source)
    adapter, guidance = split_guidance(adapter)
    if guidance:
        if not has_guidance_input(model):
            add_guidance_input(model)
        try:
            model.guidance_embedding.load_state_dict(guidance, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"LoRA adapter {source}: its guidance input does not fit "
                                  f"the model: {exc}") from None
    for name in adapted_modules(model, spec):
        weight = model.get_submodule(name).weight
        up, down = (adapter[f"{name}.{factor}.weight"].double() for factor in ("lora_B", "lora_A"))
        delta = up @ down
        weight.copy_((weight.double() + spec.scale * delta.to(weight.device)).to(weight.dtype))
    return model


def split_lora(adapter: dict[str, torch.Tensor], num_layers: int, fmt: str
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``fmt``'s module name (gpd_model.checkpoint.key_map) -> (A [R, in], B [out, R]) of
    the LoRA tensors of ``adapter``, unscaled, in float32.

    A fused projection (qkv: 3 parts, kv: 2) becomes one LoRA per part: A shared, B's rows
    split in the fused order.
    """
    names = key_map(num_layers, fmt)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in split_guidance(adapter)[0].items():
        module, factor, _ = key.rsplit(".", 2)
        if factor != "lora_A":
            continue
        external = [name.removesuffix(".weight") for name in names[f"{module}.weight"]]
        up = adapter[f"{module}.lora_B.weight"]
        for part, rows in zip(external, up.chunk(len(external), dim=0), strict=True):
            parts[part] = (down.detach().float().contiguous().clone(),
                           rows.detach().float().contiguous().clone())
    return parts
