"""Checkpoint I/O: sharded loading, strict refusal of bad files, diffusers export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from model_reference import contiguous_state, diffusers_model, relative_error
from safetensors.torch import save_file

from gpd_model import CheckpointError, DiTConfig, WanDiT, load_checkpoint, save_diffusers
from gpd_model.checkpoint import config_from_diffusers, read_state_dict

pytest.importorskip("diffusers")

CFG = DiTConfig(in_channels=3, out_channels=2, dim=20, ffn_dim=36, num_heads=2, num_layers=2,
                text_dim=6, freq_dim=12)


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 2, 4, 6, generator=generator), torch.tensor([999.0, 3.25]),
            torch.randn(2, 4, 6, generator=generator))


@pytest.fixture(scope="module")
def reference_state():
    return contiguous_state(diffusers_model(CFG, seed=7))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_index_loads_same_weights_as_single_file(reference_state, tmp_path) -> None:
    save_file(reference_state, str(tmp_path / "single.safetensors"))
    names = sorted(reference_state)
    shards = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for shard, keys in shards.items():
        save_file({k: reference_state[k] for k in keys}, str(sharded / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = sharded / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    single, from_folder, from_index = WanDiT(CFG), WanDiT(CFG), WanDiT(CFG)
    load_checkpoint(single, tmp_path / "single.safetensors")
    assert load_checkpoint(from_folder, sharded) == "diffusers"
    load_checkpoint(from_index, index)
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, from_folder.state_dict()[name])
        assert torch.equal(tensor, from_index.state_dict()[name])


def test_truncated_file_is_refused_and_model_untouched(reference_state, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(reference_state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = WanDiT(CFG)
    before = _params(model)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_renamed_and_misshaped_keys_are_all_listed_and_nothing_loads(reference_state, tmp_path):
    state = dict(reference_state)
    state["blocks.0.attn1.to_query.weight"] = state.pop("blocks.0.attn1.to_q.weight")
    state["blocks.1.ffn.net.2.bias"] = torch.zeros(5)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = WanDiT(CFG)
    before = _params(model)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(model, path)
    message = str(caught.value)
    assert "missing keys (1): ['blocks.0.attn1.to_q.weight']" in message
    assert "unexpected keys (1): ['blocks.0.attn1.to_query.weight']" in message
    assert "blocks.1.ffn.net.2.bias: expected [20], got [5]" in message
    assert "nothing was loaded" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_layout_and_missing_paths_are_named(tmp_path) -> None:
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        read_state_dict(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x"}}))
    with pytest.raises(CheckpointError, match="x named in .* does not exist"):
        read_state_dict(tmp_path / "bad.safetensors.index.json")


def test_export_round_trip_through_diffusers(reference_state, tmp_path) -> None:
    from diffusers import WanTransformer3DModel

    ours = WanDiT(CFG)
    save_file(reference_state, str(tmp_path / "in.safetensors"))
    load_checkpoint(ours, tmp_path / "in.safetensors")
    folder = save_diffusers(ours, tmp_path / "export")
    reloaded = WanTransformer3DModel.from_pretrained(folder)  # needs accelerate (test extra)
    x, timestep, context = _inputs()
    with torch.no_grad():
        want = ours(x, timestep, context)
        got = reloaded.eval()(x, timestep, context).sample
    assert relative_error(got, want) <= 1e-5
    assert config_from_diffusers(folder) == CFG
    again = WanDiT(CFG)
    assert load_checkpoint(again, folder) == "diffusers"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
