"""LoRA distillation (gpd_train.run.lora):
adapter switching, merging, one base copy, diffusers export.

References: the base model with the adapter merged explicitly (W + alpha/R B A, float64)
for the switch; diffusers' WanPipeline.load_lora_weights on a tiny pipeline for the export.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from gpd_model import CheckpointError, WanDiT, get_preset
from gpd_train.config.settings import LORA_TARGETS, LoraSpec
from gpd_train.errors import LoraError
from gpd_train.infer.export.diffusers import save_diffusers_lora
from gpd_train.run.lora import (
    BASE,
    STUDENT,
    TEACHER,
    adapter_from_params,
    adapter_shapes,
    attach_adapters,
    merge_adapter,
    use_adapter,
)

pytest.importorskip("peft")

TINY = get_preset("tiny")


def random_adapter(model: torch.nn.Module, spec: LoraSpec, dtype=torch.float64,
                   scale: float = 0.1) -> dict[str, torch.Tensor]:
    return {key: torch.randn(shape, dtype=dtype) * scale
            for key, shape in adapter_shapes(model, spec).items()}


def inputs(cfg, batch, frames, height, width, tokens, dtype=torch.float64):
    return (torch.randn(batch, cfg.in_channels, frames, height, width, dtype=dtype),
            torch.rand(batch, dtype=dtype) * 1000,
            torch.randn(batch, tokens, cfg.text_dim, dtype=dtype))


@pytest.mark.parametrize("spec, shape", [
    (LoraSpec(4, 4.0), (2, 4, 8, 8, 7)),
    (LoraSpec(1, 3.0, ("self_attn.qkv", "cross_attn.kv")), (1, 4, 6, 10, 1)),
    (LoraSpec(3, 0.5, ("ffn.2", "self_attn.o")), (3, 8, 2, 14, 5)),
])
def test_adapter_switch_equals_separate_merged_models(spec, shape):
    torch.manual_seed(hash(spec) % 1000)
    base = WanDiT(TINY).double()
    teacher = random_adapter(base, spec)
    model = attach_adapters(copy.deepcopy(base), spec, teacher)
    params = dict(model.named_parameters())
    student_init = adapter_from_params(params)
    assert set(student_init) == set(teacher)
    assert all(torch.equal(student_init[k], teacher[k]) for k in teacher)  # starts as teacher
    with torch.no_grad():  # then moves away, as training would
        for value in student_init.values():
            value.add_(torch.randn_like(value) * 0.1)
    student = {k: v.detach().clone() for k, v in adapter_from_params(params).items()}

    x, t, c = inputs(TINY, *shape)
    with torch.no_grad():
        as_student = model(x, t, c)
        with use_adapter(model, TEACHER):
            as_teacher = model(x, t, c)
        with use_adapter(model, BASE):
            as_base = model(x, t, c)
        want_student = merge_adapter(copy.deepcopy(base), student, spec, "student")(x, t, c)
        want_teacher = merge_adapter(copy.deepcopy(base), teacher, spec, "teacher")(x, t, c)
        want_base = base(x, t, c)
    torch.testing.assert_close(as_student, want_student, rtol=0, atol=1e-10)
    torch.testing.assert_close(as_teacher, want_teacher, rtol=0, atol=1e-10)
    torch.testing.assert_close(as_base, want_base, rtol=0, atol=1e-12)
    assert (as_student - as_teacher).abs().max() > 1e-3  # the adapters really differ
    # Only the student's adapter trains, before and after the switches.
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(f".{STUDENT}." in k for k in trainable)
    assert len(trainable) == len(adapter_shapes(base, spec))  # every A and B


def test_stage_one_student_starts_as_the_base():
    torch.manual_seed(1)
    base = WanDiT(TINY)
    model = attach_adapters(copy.deepcopy(base), LoraSpec(2, 2.0), None)
    x, t, c = inputs(TINY, 2, 4, 4, 4, 3, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, c), base(x, t, c), rtol=0, atol=0)
        # Stage 1 has no teacher adapter (its teacher is the base): switching to one is refused.
        with pytest.raises(LoraError, match="no LoRA adapter 'teacher'"):
            with use_adapter(model, TEACHER):
                model(x, t, c)


def test_one_base_copy_in_memory():
    spec = LoraSpec(8, 8.0)
    base = WanDiT(TINY)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    adapter_bytes = sum(4 * torch.Size(s).numel() for s in adapter_shapes(base, spec).values())
    model = attach_adapters(base, spec, random_adapter(base, spec, torch.float32))
    storages = {}
    for param in model.parameters():
        storage = param.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    assert sum(storages.values()) == base_bytes + 2 * adapter_bytes


def test_merge_matches_the_formula_and_refuses_misfits():
    torch.manual_seed(2)
    spec = LoraSpec(2, 6.0, ("cross_attn.kv",))
    base = WanDiT(TINY).double()
    adapter = random_adapter(base, spec)
    merged = merge_adapter(copy.deepcopy(base), adapter, spec, "a")
    for index in range(TINY.num_layers):
        name = f"blocks.{index}.cross_attn.kv"
        want = (base.get_submodule(name).weight + 3.0 * adapter[f"{name}.lora_B.weight"]
                @ adapter[f"{name}.lora_A.weight"])
        torch.testing.assert_close(merged.get_submodule(name).weight, want)
        other = f"blocks.{index}.self_attn.qkv"
        assert torch.equal(merged.get_submodule(other).weight, base.get_submodule(other).weight)
    wrong_rank = random_adapter(base, replace(spec, rank=3))
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(CheckpointError, match="mismatched"):
        merge_adapter(base, wrong_rank, spec, "file.safetensors")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # untouched
    with pytest.raises(CheckpointError, match="missing keys"):
        merge_adapter(base, {}, spec, "empty")


@pytest.mark.parametrize("bad, match", [
    ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": 0}, "alpha"), ({"targets": ("self_attn.q",)}, "targets"), ({"targets": ()},
                                                                           "targets"),
])
def test_spec_refuses_bad_values(bad, match):
    with pytest.raises(LoraError, match=match):
        LoraSpec(**{"rank": 4, "alpha": 4.0, "targets": LORA_TARGETS, **bad})


def test_spec_round_trips_through_metadata():
    spec = LoraSpec(5, 2.5, ("ffn.0", "self_attn.qkv"))
    assert LoraSpec.from_metadata(spec.to_metadata(), "x") == spec
    with pytest.raises(CheckpointError, match="unreadable LoRA spec"):
        LoraSpec.from_metadata('{"rank": 2}', "x.safetensors")


@pytest.mark.parametrize("spec", [LoraSpec(4, 8.0), LoraSpec(1, 1.0, ("self_attn.qkv",))])
def test_exported_lora_loaded_by_wanpipeline_equals_our_merged_student(tmp_path, spec):
    from diffusers import WanPipeline
    from realscale_fixtures import build_wan_folder

    from gpd_model import load_checkpoint
    from gpd_model.checkpoint import config_from_diffusers

    folder = build_wan_folder(tmp_path / "wan")
    ours = WanDiT(config_from_diffusers(folder / "transformer"))
    load_checkpoint(ours, folder / "transformer")
    torch.manual_seed(3)
    adapter = random_adapter(ours, spec, torch.float32, scale=0.3)
    weights = save_diffusers_lora(adapter, spec, ours.cfg.num_layers, tmp_path / "lora")

    pipe = WanPipeline.from_pretrained(str(folder))
    x, t, c = inputs(ours.cfg, 2, 2, 4, 6, 5, torch.float32)

    def transformer_output():
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c,
                                    return_dict=False)[0]

    plain = transformer_output()
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    theirs = transformer_output()
    with torch.no_grad():
        want = merge_adapter(ours, adapter, spec, "adapter")(x, t, c)
    torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-5)
    assert (theirs - plain).abs().max() > 1e-2  # the LoRA was applied, not ignored
