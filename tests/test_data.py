"""Built-in procedural videos and the real-scale prompt-embedding data set."""

import pytest
import torch
from safetensors.torch import save_file

from gpd_model import get_preset
from gpd_train.data.datasets import open_data
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.data.procedural import MOTIONS, SHAPES, ProceduralVideos


@pytest.mark.parametrize("frames,size,speed", [(4, 16, 2), (8, 12, 1), (3, 9, 2)])
def test_procedural_videos_are_deterministic_from_the_seed(frames, size, speed):
    data = ProceduralVideos(16, frames=frames, size=size, speed=speed, seed=7)
    indices = torch.tensor([0, 5, 123456, 2**30])
    first = data.videos(indices)
    same = ProceduralVideos(16, frames=frames, size=size, speed=speed, seed=7)
    other = ProceduralVideos(16, frames=frames, size=size, speed=speed, seed=8)
    assert torch.equal(first, same.videos(indices))
    assert not torch.equal(first, other.videos(indices))
    assert first.shape == (4, 3, frames, size, size)
    assert first.min() >= -1 and first.max() <= 1
    draws = [data.draw(torch.Generator().manual_seed(3), 5, with_latents=True) for _ in range(2)]
    assert torch.equal(draws[0][0].text, draws[1][0].text)
    assert torch.equal(draws[0][1], draws[1][1])


@pytest.mark.parametrize("frames,size,speed", [(4, 16, 2), (8, 12, 1)])
def test_every_sample_keeps_its_whole_shape_on_the_canvas(frames, size, speed):
    data = ProceduralVideos(16, frames=frames, size=size, speed=speed)
    videos = data.videos(torch.arange(240))
    area = (videos.amax(dim=1) > -0.5).float().sum(dim=(2, 3))  # [N, T]
    assert (area > 0).all() and torch.equal(area, area[:, :1].expand_as(area))


@pytest.mark.parametrize("frames,size,speed", [(4, 16, 2), (4, 11, 2), (4, 10, 1), (4, 8, 1),
                                               (2, 7, 2), (3, 7, 1)])
def test_default_speed_is_two_pixels_unless_the_canvas_is_too_small(frames, size, speed):
    data = ProceduralVideos(8, frames=frames, size=size)
    assert data.speed == speed
    videos = data.videos(torch.arange(24))
    _, motion = data.classify(videos)
    assert torch.equal(motion, torch.arange(24) % 4)


@pytest.mark.parametrize("frames,size,radius", [(4, 16, 3), (4, 11, 2), (3, 9, 2)])
def test_each_shape_has_one_colour_and_one_size(frames, size, radius):
    data = ProceduralVideos(8, frames=frames, size=size, seed=4)
    indices = torch.arange(120)
    videos = data.videos(indices)
    foreground = videos.amax(dim=1) > -0.5  # [N, T, H, W]
    colours = torch.stack([videos[n, :, 0][:, foreground[n, 0]].mean(dim=1)
                           for n in range(len(indices))])  # [N, 3]
    shape_ids = (indices % data.num_prompts) // len(MOTIONS)
    for shape_id in range(len(SHAPES)):
        mine = colours[shape_ids == shape_id]
        assert torch.allclose(mine, mine[:1].expand_as(mine))
        assert not torch.allclose(mine[0], colours[shape_ids != shape_id][0])
    square_area = foreground[shape_ids == 0, 0].sum(dim=(1, 2))
    assert (square_area == (2 * radius + 1) ** 2).all()


def test_classes_are_distinct_and_recognisable():
    data = ProceduralVideos(32, seed=1)
    contexts = data.context(torch.arange(data.num_prompts))
    flat = contexts.flatten(1)
    distances = torch.cdist(flat, torch.cat([flat, data.negative_context.flatten()[None]]))
    off_diagonal = distances + torch.eye(data.num_prompts, data.num_prompts + 1) * 1e9
    assert off_diagonal.min() > 1.0  # no two prompts (nor the null prompt) coincide
    assert data.num_prompts == len(SHAPES) * len(MOTIONS) == 12
    indices = torch.arange(600)
    shape, motion = data.classify(data.videos(indices))
    prompt = indices % data.num_prompts
    assert torch.equal(shape, prompt // len(MOTIONS))
    assert torch.equal(motion, prompt % len(MOTIONS))
    assert data.prompt_name(5) == "a disc moving left"


def test_classify_rejects_an_empty_canvas_and_bad_shapes():
    data = ProceduralVideos(8)
    shape, motion = data.classify(torch.full((2, 3, 8, 12, 12), -1.0))
    assert shape.tolist() == [-1, -1] and motion.tolist() == [-1, -1]
    with pytest.raises(ValueError, match=r"videos must be \[B, 3, T, H, W\], got \(2, 8, 12\)"):
        data.classify(torch.zeros(2, 8, 12))


def test_procedural_input_errors():
    with pytest.raises(ValueError, match="size must be an int >= 11, got 9"):
        ProceduralVideos(8, frames=4, size=9, speed=2)
    with pytest.raises(ValueError, match="size must be an int >= 8, got 7"):
        ProceduralVideos(8, frames=4, size=7)  # too small even at the slowest default
    with pytest.raises(ValueError, match="speed must be an int >= 1, got 0"):
        ProceduralVideos(8, speed=0)
    data = ProceduralVideos(8)
    with pytest.raises(ValueError, match="prompt_ids must lie in"):
        data.context(torch.tensor([12]))
    with pytest.raises(ValueError, match="indices must be a 1-D int64 tensor, got torch.float32"):
        data.videos(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        data.draw(0, 2, with_latents=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        data.draw(torch.Generator(), 0, with_latents=False)
    with pytest.raises(ValueError, match="a model for t2v on it has in_channels 3 and "
                                         "out_channels 3, got 16 and 16"):
        open_data(None, get_preset("tiny", in_channels=16, out_channels=16), seed=0)


def write_set(folder, rows=(3, 2), length=5, text_dim=6, latents=True, latent_shape="2,3,4,4"):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(rows):
        tensors = {"context": torch.randn(n, length, text_dim, generator=gen).half()}
        if latents:
            tensors["latents"] = torch.randn(n, 2, 3, 4, 4, generator=gen)
        save_file(tensors, str(folder / f"shard-{i:03d}.safetensors"),
                  metadata=None if latents else {"latent_shape": latent_shape})
    save_file({"context": torch.randn(1, length, text_dim, generator=gen)},
              str(folder / "negative.safetensors"))
    return folder


def test_prompt_embedding_set_reads_rows_across_shards(tmp_path):
    folder = write_set(tmp_path / "set")
    data = PromptEmbeddingSet(folder, text_dim=6, latent_channels=2)
    assert (data.num_rows, data.context_len, data.text_dim) == (5, 5, 6)
    assert data.latent_shape == (2, 3, 4, 4) and data.negative_context.shape == (5, 6)
    from safetensors.torch import load_file

    second = load_file(str(folder / "shard-001.safetensors"))
    rows, latents = data.rows([4, 0])
    assert torch.equal(rows.text[0], second["context"][1].float())
    assert torch.equal(latents[0], second["latents"][1])
    cond, latents = data.draw(torch.Generator().manual_seed(1), 4, with_latents=False)
    assert cond.text.shape == (4, 5, 6) and cond.text.dtype == torch.float32 and latents is None
    assert cond.guidance is None and cond.image_latent is None
    assert torch.equal(data.negative.text, data.negative_context[None])


def test_prompt_embedding_set_without_latents(tmp_path):
    data = PromptEmbeddingSet(write_set(tmp_path / "set", latents=False))
    assert not data.has_latents and data.latent_shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="has no 'latents'.*--teacher"):
        data.draw(torch.Generator(), 2, with_latents=True)
    bad = write_set(tmp_path / "bad", latents=False, latent_shape="2,3")
    with pytest.raises(ValueError, match="latent_shape must have 4 entries"):
        PromptEmbeddingSet(bad)


def test_prompt_embedding_set_validation(tmp_path):
    with pytest.raises(ValueError, match="text_dim 6 does not match the model's text_dim 8"):
        PromptEmbeddingSet(write_set(tmp_path / "a"), text_dim=8)
    with pytest.raises(ValueError, match="latent channels 2 do not match.*in_channels 16"):
        PromptEmbeddingSet(write_set(tmp_path / "b"), latent_channels=16)
    folder = write_set(tmp_path / "c")
    (folder / "negative.safetensors").unlink()
    with pytest.raises(ValueError, match="missing .*negative.safetensors"):
        PromptEmbeddingSet(folder)
    folder = write_set(tmp_path / "d")
    save_file({"context": torch.randn(2, 7, 6), "latents": torch.randn(2, 2, 3, 4, 4)},
              str(folder / "shard-009.safetensors"))
    with pytest.raises(ValueError, match=r"shard-009.*differs from the earlier shards"):
        PromptEmbeddingSet(folder)
    folder = write_set(tmp_path / "e")
    save_file({"context": torch.randn(2, 5, 6), "latents": torch.randn(3, 2, 3, 4, 4)},
              str(folder / "shard-009.safetensors"))
    with pytest.raises(ValueError, match=r"'latents' must be \[2, C, T, H, W\]"):
        PromptEmbeddingSet(folder)
    with pytest.raises(ValueError, match="no shard-"):
        PromptEmbeddingSet((tmp_path / "empty").resolve().parent)
    with pytest.raises(ValueError, match="row 9 out of range"):
        PromptEmbeddingSet(write_set(tmp_path / "f")).rows([9])
