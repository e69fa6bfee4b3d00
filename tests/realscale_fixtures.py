"""A tiny Wan2.1-T2V-Diffusers folder built in code (nothing downloaded).

Same layout and classes as Wan-AI/Wan2.1-T2V-1.3B-Diffusers, at toy sizes: a random
transformers UMT5EncoderModel (d_model = the DiT's text_dim), a Unigram tokenizer made with
the `tokenizers` library and saved as a transformers fast tokenizer (pad 0, eos 1 appended,
as umT5's), a random AutoencoderKLWan with 4 latent channels, a random
WanTransformer3DModel, Wan's UniPC scheduler config and model_index.json, all written by
diffusers' WanPipeline.save_pretrained. ``build_wan22_folder``: the Wan2.2 A14B layout, two
experts of that shape (``transformer/`` high-noise, ``transformer_2/`` low-noise, differently
seeded) and ``boundary_ratio`` in model_index.json. ``build_wan_i2v_folder``: the
Wan2.1-I2V-Diffusers layout (a 12-channel transformer input: noisy latent, 4-channel frame mask,
condition latent; image keys/values in cross-attention; a random transformers CLIPVisionModel
and its CLIPImageProcessor) or, with ``image_encoder=False``, the Wan2.2-I2V single-expert
layout (no image encoder, no image tokens), written by diffusers' WanImageToVideoPipeline.
``build_wan_ti2v_folder``: the Wan2.2-TI2V-5B layout, a WanPipeline with ``expand_timesteps``
whose VAE is configured as diffusers configures the Wan2.2 one (residual blocks, RGB
patchified 2 x 2 into 12 channels, 16x spatial compression) and whose transformer takes and
gives the VAE's latent (in = out = z_dim).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

TEXT_DIM = 32
LATENT_CHANNELS = 4
# A 5-frame 32 x 48 video: latents [4, 2, 4, 6] through the VAE's 4x time / 8x space.
VIDEO = {"frames": 5, "height": 32, "width": 48}
LATENT_SHAPE = (LATENT_CHANNELS, 2, 4, 6)
WORDS = ("a the red blue green cat dog bird runs jumps flies over under quickly slowly "
         "in park sky water").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -9.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_transformer(**changes: object):
    """A random tiny WanTransformer3DModel (``changes`` override its arguments)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**{
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16,
        "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "text_dim": TEXT_DIM,
        "freq_dim": 256, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, **changes})


def build_wan_folder(root: Path, seed: int = 0) -> Path:
    """Write the tiny folder at ``root`` and return it."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    WanPipeline(**_shared_components(), transformer=tiny_transformer()).save_pretrained(str(root))
    return root


def build_wan22_folder(root: Path, boundary_ratio: float, seed: int = 0) -> Path:
    """Write a tiny two-expert Wan2.2 A14B-layout folder at ``root`` and return it."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    WanPipeline(**_shared_components(), transformer=tiny_transformer(),
                transformer_2=tiny_transformer(), boundary_ratio=boundary_ratio
                ).save_pretrained(str(root))
    return root


PAIR_PROMPTS = ("a red cat runs in the park", "the blue dog jumps", "green bird flies")


def pair_run_args(wan22: Path, folder: Path, toml: str,
                  prompts: Sequence[str] = PAIR_PROMPTS, run_dir: bool = True) -> list[str]:
    """The training CLI arguments of a run distilling the two-expert folder ``wan22`` at the
    tiny video size, its TOML and prompts written into ``folder`` (its run in
    ``folder/run``, unless ``run_dir`` is False: the caller adds --run-dir)."""
    (folder / "run.toml").write_text(toml)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    where = ["--run-dir", folder / "run"] if run_dir else []
    return [str(v) for v in (
        "--config", folder / "run.toml", *where, "--device", "cpu", "--teacher", wan22,
        "--prompts", folder / "prompts.txt", "--threads", 1, "--height", VIDEO["height"],
        "--width", VIDEO["width"], "--frames", VIDEO["frames"])]


# CLIP stand-in: 28 x 28 pixels in 14 x 14 patches -> 4 patch tokens + 1 class token.
IMAGE_SIZE = 28
IMAGE_DIM = 24
IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2 + 1
# The Wan VAE compresses time 4x, so the frame mask takes 4 channels of the transformer input.
MASK_CHANNELS = 4


def build_wan_i2v_folder(root: Path, image_encoder: bool = True, seed: int = 0,
                         boundary_ratio: float | None = None) -> Path:
    """Write a tiny image-to-video Wan folder at ``root`` and return it.

    ``image_encoder=True``: Wan2.1-I2V (CLIP image tokens); ``False``: Wan2.2-I2V style (none).
    ``boundary_ratio``: a second expert, ``transformer_2``, below it (Wan2.2-I2V-A14B).
    """
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    image_parts: dict[str, object] = {"image_encoder": None, "image_processor": None}
    transformer_image: dict[str, object] = {}
    if image_encoder:
        image_parts = {
            "image_encoder": CLIPVisionModel(CLIPVisionConfig(
                hidden_size=IMAGE_DIM, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                projection_dim=IMAGE_DIM)),
            "image_processor": CLIPImageProcessor(
                size={"shortest_edge": IMAGE_SIZE},
                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        }
        transformer_image = {"image_dim": IMAGE_DIM, "added_kv_proj_dim": 32}
    def transformer():
        return tiny_transformer(in_channels=2 * LATENT_CHANNELS + MASK_CHANNELS,
                                **transformer_image)

    experts = {} if boundary_ratio is None else {"transformer_2": transformer(),
                                                 "boundary_ratio": boundary_ratio}
    WanImageToVideoPipeline(**_shared_components(), **image_parts, transformer=transformer(),
                            **experts).save_pretrained(str(root))
    return root


# Wan2.2-TI2V: a 16x spatial VAE (3 halvings x the 2 x 2 patchify) and a latent of its own
# width (48 at scale; 6 here, unlike the 4 of the folders above); 5 frames of 64 x 96 ->
# latents [6, 2, 4, 6] (height and width multiples of 16 x the transformer's patch 2).
TI2V_CHANNELS = 6
TI2V_VIDEO = {"frames": 5, "height": 64, "width": 96}
TI2V_LATENT_SHAPE = (TI2V_CHANNELS, 2, 4, 6)


def ti2v_vae():
    """A random tiny Wan2.2-style AutoencoderKLWan (16x spatial, TI2V_CHANNELS latent)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=TI2V_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1], latents_std=[1.5, 0.5, 2.0, 1.0, 0.8, 1.2])


def build_wan_ti2v_folder(root: Path, seed: int = 0) -> Path:
    """Write a tiny Wan2.2-TI2V-layout folder at ``root`` and return it."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    components = {**_shared_components(), "vae": ti2v_vae()}
    transformer = tiny_transformer(in_channels=TI2V_CHANNELS, out_channels=TI2V_CHANNELS)
    WanPipeline(**components, transformer=transformer, expand_timesteps=True
                ).save_pretrained(str(root))
    return root


def _shared_components() -> dict[str, object]:
    """Tokenizer, text encoder, VAE and scheduler (random, from the current torch seed)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", pad_token_id=0,
        eos_token_id=1))
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return {"tokenizer": tokenizer, "text_encoder": encoder, "vae": vae, "scheduler": scheduler}


# Image-to-video inputs: odd sizes and a grey one (the pipelines stretch each image to the video
# size; grey becomes RGB).
IMAGE_PROMPTS = ["a red cat runs in the park", "the blue dog jumps", "green bird flies"]
IMAGES = {"a.png": ((37, 53), "RGB"), "b.jpg": ((64, 40), "RGB"), "c.png": ((21, 90), "L")}


def write_image_inputs(folder: Path) -> tuple[Path, Path]:
    """IMAGES and a prompts file and an images file (line i: prompt i's image, relative to
    its folder) in ``folder``; returns (prompts file, images file)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, ((height, width), mode) in IMAGES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / name)
    (folder / "prompts.txt").write_text("\n".join(IMAGE_PROMPTS) + "\n")
    (folder / "images.txt").write_text("\n".join(IMAGES) + "\n")
    return folder / "prompts.txt", folder / "images.txt"
