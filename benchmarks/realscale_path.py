"""Time and peak memory of the 1.3B encode -> sample -> decode -> MP4 path, random weights.

Issue 13's last acceptance bullet. Everything is built from configs, nothing is downloaded
(the GPU machine has no network):

1. a umT5-XXL encoder: transformers' UMT5EncoderModel from a UMT5Config with the sizes of
   google/umt5-xxl, the text encoder of Wan2.1-T2V-1.3B-Diffusers (d_model 4096, d_ff 10240,
   24 layers, 64 heads, d_kv 64, vocab 256384, 32 relative-attention buckets, max distance
   128, gated-gelu). These numbers agree across several public copies of that config found
   with the code search (Wan's own configs name 'google/umt5-xxl' as the tokenizer); the
   official config.json itself was not read. Built in bf16 directly on the device (~11 GiB).
2. our WanDiT at ``--preset`` (default wan2.1-t2v-1.3b), bf16 (~2.6 GiB).
3. diffusers' AutoencoderKLWan with its default config (the Wan2.1 VAE), tiling on.

Steps, each timed with torch.cuda.synchronize around it and the peak-memory counter reset
before it: ``encode`` (a batch of random token ids padded to 512, Wan-style: padding
masked, then zeroed), ``sample`` (``euler_sample``, 6 steps, no CFG, one latent
[1, 16, 21, 60, 104]: 81 frames at 480 x 832), ``decode`` (gpd_train.infer.media.decode_latents)
and ``write_mp4`` (gpd_train.infer.media.write_mp4). The encoder is deleted and the cache emptied
before the DiT is built. Each step is timed once, cold: first-call kernel selection and
allocator growth are inside the numbers. ``peak_gib`` is max_memory_allocated during the
step, resident weights included; ``resident_gib`` is what was allocated when it began.

One JSON line per step, then a table and a ``SUMMARY`` line (device_check.sh's block
table); ``--out`` writes the whole result as JSON.

    python benchmarks/realscale_path.py --out realscale.json      # on a GPU
    python benchmarks/realscale_path.py --tiny                    # CPU dry run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpd_model import (
    Conditioning,
    DiTDenoiser,
    WanDiT,
    euler_sample,
    get_preset,
    make_noise,
    sigma_grid,
)

GIB = 2**30
UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64,
            "vocab_size": 256384, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128}
# --tiny: the sizes of tests/realscale_fixtures.py (4 latent channels, 5-frame 32 x 48 video).
TINY_UMT5 = {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8,
             "vocab_size": 1000, "relative_attention_num_buckets": 8,
             "relative_attention_max_distance": 16}
TINY_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True], "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 0.5, 2.0, 1.0]}
TINY_LATENT = "4,2,4,6"
WAN_LATENT = "16,21,60,104"
SHIFT = 5.0  # the sampling shift does not change the cost


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(name: str, device: torch.device, rows: list[dict], fn: Callable[..., object],
          *args: object) -> object:
    """Run ``fn(*args)`` once between synchronizations; append and print its row."""
    _synchronize(device)
    resident = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = fn(*args)
    _synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    row = {"step": name, "seconds": seconds, "peak_gib": peak, "resident_gib": resident}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def _parse_latent(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--latent must be C,T,H,W integers, got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--latent must be four positive integers C,T,H,W, got {text!r}")
    return shape


def build_encoder(sizes: dict, device: torch.device):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**sizes, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init on the device, already in bf16
    try:
        with torch.device(device):
            encoder = UMT5EncoderModel(config)
    finally:
        torch.set_default_dtype(previous)
    return encoder.eval().requires_grad_(False)


def random_prompts(batch: int, text_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Token ids [batch, text_len] and their mask: random lengths, eos 1, pad 0 after it."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, text_len), generator=generator)
    lengths = torch.randint(8, max(9, text_len // 4), (batch,), generator=generator)
    lengths = lengths.clamp(max=text_len)
    positions = torch.arange(text_len)[None]
    ids[positions == (lengths[:, None] - 1)] = 1
    mask = (positions < lengths[:, None]).long()
    return ids * mask, mask


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        cfg = get_preset("tiny", in_channels=4, out_channels=4, patch_size=(1, 2, 2))
        umt5, vae_config = dict(TINY_UMT5, d_model=cfg.text_dim), TINY_VAE
    else:
        cfg, umt5, vae_config = get_preset(args.preset), UMT5_XXL, {}
    latent = _parse_latent(args.latent or (TINY_LATENT if args.tiny else WAN_LATENT))
    z_dim = vae_config.get("z_dim", 16)
    if cfg.text_dim != umt5["d_model"] or cfg.in_channels != latent[0] or latent[0] != z_dim:
        raise SystemExit(f"preset {args.preset!r}: text_dim {cfg.text_dim}, in_channels "
                         f"{cfg.in_channels}; the encoder gives {umt5['d_model']}, the VAE has "
                         f"{z_dim} latent channels, --latent has {latent[0]}: they must agree")
    rows: list[dict] = []
    torch.manual_seed(args.seed)

    encoder = build_encoder(umt5, device)
    ids, mask = random_prompts(args.prompts, args.text_len, umt5["vocab_size"], args.seed)

    def encode(encoder: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device))
            hidden = hidden.last_hidden_state
        return hidden * mask.to(device)[..., None].to(hidden.dtype)  # Wan zeroes the padding

    context = timed("encode", device, rows, encode, encoder)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with torch.device(device):
        model = WanDiT(cfg)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    noise = make_noise((1, *latent), args.seed, device)  # float32, as the sampler CLI
    sigmas = sigma_grid(args.steps, SHIFT)
    latents = timed("sample", device, rows, euler_sample, DiTDenoiser(model), noise,
                    Conditioning(context[:1]), sigmas)
    del model, context
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from diffusers import AutoencoderKLWan

    from gpd_train.infer.media import decode_latents, write_mp4

    with torch.device(device):
        vae = AutoencoderKLWan(**vae_config)
    if args.vae_dtype == "bf16":
        vae = vae.to(torch.bfloat16)
    vae = vae.eval().requires_grad_(False)
    if not args.no_tiling:
        vae.enable_tiling()
    video = timed("decode", device, rows, decode_latents, vae, latents)[0]
    del vae
    with tempfile.TemporaryDirectory() as folder:
        mp4 = Path(args.mp4) if args.mp4 else Path(folder) / "realscale.mp4"
        timed("write_mp4", device, rows, write_mp4, mp4, video)
        mp4_bytes = mp4.stat().st_size

    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny,
        "preset": "tiny" if args.tiny else args.preset,
        "encoder": umt5, "vae": vae_config or "AutoencoderKLWan() defaults (Wan2.1)",
        "vae_dtype": args.vae_dtype, "vae_tiling": not args.no_tiling,
        "prompts": args.prompts, "text_len": args.text_len, "latent": list(latent),
        "steps": args.steps, "video": list(video.shape), "mp4_bytes": mp4_bytes,
        "latents_finite": bool(torch.isfinite(latents).all()),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def report(result: dict) -> None:
    print(f"\n## realscale_path: {result['preset']} on {result['device_name']}, latent "
          f"{result['latent']}, {result['steps']} steps, video {result['video']}")
    print("| step | seconds | peak GiB | resident GiB |")
    print("|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['step']} | {_fmt(row['seconds'], '.2f')} | {_fmt(row['peak_gib'], '.2f')} "
              f"| {_fmt(row['resident_gib'], '.2f')} |")
    cells = " ".join(f"{row['step']} {row['seconds']:.1f}s/{_fmt(row['peak_gib'], '.1f')}GiB"
                     for row in result["rows"])
    print(f"SUMMARY realscale-path {cells}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="toy encoder, DiT, VAE and latent (CPU dry run)")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b", help="DiT preset (not with --tiny)")
    parser.add_argument("--latent", help=f"C,T,H,W (default {WAN_LATENT}, --tiny {TINY_LATENT})")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=1, help="prompts encoded in one batch")
    parser.add_argument("--text-len", type=int, default=512, help="padded prompt length")
    parser.add_argument("--vae-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--no-tiling", action="store_true", help="decode without VAE tiling")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mp4", help="keep the MP4 here (default: a temporary file)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or args.text_len < 16:
        parser.error("--steps and --prompts must be >= 1, --text-len >= 16")
    result = run(args)
    report(result)
    return result


if __name__ == "__main__":
    main()
