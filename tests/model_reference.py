"""Helpers shared by the gpd_model tests (no tests here): random diffusers reference, renaming."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

# diffusers name -> original Wan2.1 name, written from Wan's public model layout (independent
# of gpd_model.checkpoint, so the loader is checked against a second reading of the formats).
_DIFFUSERS_TO_WAN = [
    # Wan2.1-I2V: img_emb.proj = (LayerNorm, Linear, GELU, Linear, LayerNorm); the image
    # keys/values of the cross-attention are k_img/v_img with the key norm norm_k_img.
    # Before the general rules: image_embedder.norm2 is not a block's norm2.
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"\.attn2\.add_([kv])_proj\.", r".cross_attn.\1_img."),
    (r"\.attn2\.norm_added_k\.", ".cross_attn.norm_k_img."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.norm_", ".self_attn.norm_"),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.norm_", ".cross_attn.norm_"),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def diffusers_to_wan_name(name: str) -> str:
    for pattern, replacement in _DIFFUSERS_TO_WAN:
        name, count = re.subn(pattern, replacement, name)
        if count:
            return name
    return name


def diffusers_model(cfg, seed: int):
    """diffusers' WanTransformer3DModel for ``cfg`` with every weight random (norms included)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps, image_dim=cfg.image_dim,
        added_kv_proj_dim=None if cfg.image_dim is None else cfg.dim,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = (name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_k.weight"))
                       or ".norm2." in name or ".image_embedder.norm1." in name)
            if is_norm:
                # Norm gains away from 1 so that a swapped or dropped norm is visible.
                param.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1 * noise)
    return model.eval()


def contiguous_state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}


def write_checkpoints(reference, folder) -> tuple[str, str]:
    """``reference``'s weights as a diffusers-format and a Wan-format file in ``folder``."""
    state = contiguous_state(reference)
    save_file(state, str(folder / "diffusers.safetensors"))
    save_file({diffusers_to_wan_name(k): v for k, v in state.items()},
              str(folder / "wan.safetensors"))
    return str(folder / "diffusers.safetensors"), str(folder / "wan.safetensors")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def loss_and_grads(run, params: dict[str, torch.Tensor], x, timestep, context, **extra):
    """``run(x, timestep, context, **extra)``, then the gradients of a fixed weighting of its
    output: (output, {input name: gradient} for x, context and ``extra``, {param: gradient})."""
    inputs = {"x": x, "context": context, **extra}
    inputs = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    extra = {name: inputs[name] for name in extra}
    out = run(inputs["x"], timestep, inputs["context"], **extra)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    input_grads = {name: tensor.grad for name, tensor in inputs.items()}
    return out.detach(), input_grads, {name: p.grad for name, p in params.items()}


# Our WanDiT against diffusers' with the same weights: float32 rounding, relative to the norm.
PARITY = 1e-5


def diffusers_gradients(reference, x, timestep, context, **extra):
    """``reference``'s (diffusers') output and gradients, as ``loss_and_grads`` gives them;
    ``image_tokens`` in ``extra`` is its encoder_hidden_states_image."""
    def run(x, timestep, context, image_tokens=None):
        return reference(x, timestep, context, encoder_hidden_states_image=image_tokens).sample
    return loss_and_grads(run, dict(reference.named_parameters()), x, timestep, context, **extra)


def assert_matches_diffusers(ours, want, x, timestep, context, label: str = "", **extra):
    """``ours`` (a WanDiT holding the reference's weights) gives ``want`` (diffusers_gradients
    of the reference): the output, the inputs' gradients and every parameter's (diffusers'
    parameters gathered through gpd_model's key map) to PARITY; returns our output."""
    from gpd_model.checkpoint import key_map

    want_out, want_inputs, want_grads = want
    out, inputs, grads = loss_and_grads(ours, dict(ours.named_parameters()), x, timestep,
                                        context, **extra)
    assert out.shape == want_out.shape and relative_error(out, want_out) <= PARITY, label
    assert set(inputs) == set(want_inputs) == {"x", "context", *extra}, label
    for name, grad in inputs.items():
        assert relative_error(grad, want_inputs[name]) <= PARITY, (label, name)
    names = key_map(ours.cfg.num_layers, "diffusers", image=ours.cfg.image_dim is not None)
    assert {s for sources in names.values() for s in sources} == set(want_grads), label
    for name, sources in names.items():
        gathered = torch.cat([want_grads[s] for s in sources])
        assert relative_error(grads[name], gathered) <= PARITY, (label, name)
    return out
