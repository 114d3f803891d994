"""Pretrain the shapes world's text-to-video generator (the model the embedded world post-trains).

A VideoCrafter2/ModelScope-style latent video diffusion model built from diffusers and transformers classes:

* ``vae/``: a tiny per-frame ``AutoencoderKL`` (32x32x3 <-> 16x16x4, factor 2), trained here first on frames
  of the world (L1 + MSE reconstruction, a light KL); ``scaling_factor`` makes the latents unit-variance.
* ``text_encoder/`` + ``tokenizer/``: a frozen ``transformers.BertModel`` -- the text-only layers of a
  world video-text model (``scripts/pretrain_world_vlm.py``; the shipped generator: its stage 0), converted
  weight for weight, with its word tokenizer. As Stable Diffusion reuses CLIP's text tower, the generator
  reuses a VLM's; the shipped reward VLM trains its own copy further (as the paper's generator conditions on
  OpenCLIP and its reward is InternVideo2's). Captions are padded to 20 tokens (the longest caption has 19).
* ``unet/``: a ``UNet3DConditionModel`` over 8x16x16x4 latents (epsilon prediction, cross-attention to the
  text tokens at 8x8 and 4x4), trained with min-SNR-weighted denoising loss, captions dropped 10% of the time
  for classifier-free guidance, and an EMA of the weights (saved).
* ``scheduler/``: ``DDIMScheduler`` (scaled-linear betas 0.00085-0.012 over 1000 steps, as VideoCrafter2 /
  ModelScope and ``pisces_fast.training.generators.tiny_scheduler``).

The directory is what ``pisces_fast.training.generators.load_generator`` reads (plus ``pisces_generator.json``
with the clip size and the text length), and ``model_index.json`` makes it a diffusers
``TextToVideoSDPipeline`` too.

At the end it samples train and held-out prompts (DDIM, classifier-free guidance) and scores real and
generated clips with the world's analyzer (``pisces_fast.eval.analyzer``) and with the world's VLM, and writes
GIF grids and a PNG contact sheet.

    python scripts/pretrain_world_generator.py --vlm STAGE0 --out pisces_fast/assets/world/generator

(``STAGE0``: the first of the world VLM's runs, ``scripts/pretrain_world_vlm.py --out STAGE0``, whose text tower
the shipped generator conditions on.)

``--init_from DIR`` continues a saved generator (the shipped one's second stage:
``--init_from STAGE1 --pool_size 12288 --steps 3000 --lr 3e-4 --warmup 50 --save_every 200``; ``training_summary.json`` lists every stage's command).

Resumable: ``--resume`` reuses a finished VAE stage and continues UNet training from
``<report_dir>/checkpoint`` (written atomically every ``--save_every`` steps); every random choice is a
function of ``(--seed, step)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pisces_fast.data import shapes as S
from pisces_fast.training.generators import FrameVAECodec, TransformersTextEncoder, VideoGenerator

TEXT_MAX_LENGTH = 20  # the longest caption is 17 words + [CLS] + [SEP]
NUM_FRAMES, SIZE = 8, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vlm", default="pisces_fast/assets/world/vlm",
                   help="a world VLM whose text tower conditions the UNet (the shipped generator's: STAGE0 of "
                        "scripts/pretrain_world_vlm.py; the shipped reward VLM has trained its own copy further)")
    p.add_argument("--out", default="pisces_fast/assets/world/generator")
    p.add_argument("--report_dir", default="outputs/world_generator", help="samples, metrics, curves, checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool_size", type=int, default=6144, help="train clips rendered and encoded once")
    # VAE stage
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--vae_batch", type=int, default=32, help="frames per VAE step")
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--vae_kl", type=float, default=1e-4, help="KL weight per latent element")
    # UNet stage
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--cfg_drop", type=float, default=0.1, help="share of captions replaced by '' (classifier-free guidance)")
    p.add_argument("--min_snr_gamma", type=float, default=5.0)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--channels", default="32,64,64", help="UNet block_out_channels")
    p.add_argument("--save_every", type=int, default=100)
    # evaluation
    p.add_argument("--eval_prompts", type=int, default=48, help="train and held-out prompts sampled at the end")
    p.add_argument("--eval_steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init_from", default=None,
                   help="continue pretraining a saved generator directory (e.g. the shipped one): its VAE, text encoder "
                        "and tokenizer are reused as they are (no VAE stage, no --vlm conversion), its UNet weights "
                        "start both the trained UNet and its EMA; --steps more steps with a fresh optimizer (warm-up, "
                        "cosine). --vlm still scores the final evaluation")
    p.add_argument("--vae_only", action="store_true", help="stop after the VAE stage (a later --resume reuses it)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------------------
def text_tower_from_vlm(vlm_dir: str):
    """The VLM's text-only layers as a ``transformers.BertModel`` (same weights, same outputs) + its tokenizer."""
    from transformers import BertConfig, BertModel

    from pisces_fast.rewards.backbones.internvideo2 import InternVideo2Backbone

    backbone = InternVideo2Backbone.from_pretrained(vlm_dir).eval()
    cfg = backbone.model.config
    n_text = cfg.fusion_start
    if n_text < 1:
        raise ValueError(f"{vlm_dir}: the VLM has no text-only layer (fusion starts at layer {n_text})")
    bert_cfg = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, num_hidden_layers=n_text, num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_token_id,
        use_attention_mask=True,  # diffusers' TextToVideoSDPipeline then passes the mask, as load_generator does
    )
    bert = BertModel(bert_cfg).eval()
    state = {}
    for key, value in backbone.model.text_encoder.state_dict().items():
        if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= n_text:
            continue
        state[key] = value
    # The pooler is not part of the VLM; an identity pooler (tanh of [CLS]) keeps the checkpoint deterministic.
    state["pooler.dense.weight"] = torch.eye(cfg.text_width)
    state["pooler.dense.bias"] = torch.zeros(cfg.text_width)
    missing, unexpected = bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(f"VLM text tower -> BertModel: missing {missing}, unexpected {unexpected}")
    tokenizer = backbone.tokenizer
    tokenizer.model_max_length = TEXT_MAX_LENGTH
    with torch.no_grad():  # the conversion must be exact
        enc = tokenizer(["a small red circle moving left and a blue square staying still", ""], padding="max_length",
                        max_length=TEXT_MAX_LENGTH, return_tensors="pt")
        ours, mask = backbone.model.encode_text(enc["input_ids"], enc["attention_mask"])
        theirs = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        err = float((ours - theirs)[mask].abs().max())
    if err > 1e-4:
        raise RuntimeError(f"VLM text tower -> BertModel conversion differs by {err:.2e}")
    bert.requires_grad_(False)
    return bert, tokenizer


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=SIZE, mid_block_add_attention=False, scaling_factor=1.0,
    )


def build_unet(channels, cross_attention_dim: int):
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4,
        # attention is where it is cheap: none at 16x16, cross-attention to the caption at 8x8 and 4x4
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
        block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )


def load_saved_generator(path: str):
    """(frozen VAE, frozen text tower, tokenizer, UNet in float32, its training summary or None) of a generator
    directory this script saved, loaded as the main job loads it, to continue training it (``--init_from``)."""
    from pisces_fast.world.assets import load_world_generator

    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise FileNotFoundError(f"--init_from {path}: expected a generator saved by this script, {sub}/ is missing")
    gen = load_world_generator(path)
    tokenizer = gen.text_encoder.tokenizer
    tokenizer.model_max_length = TEXT_MAX_LENGTH
    summary_path = os.path.join(path, "training_summary.json")
    previous = None
    if os.path.isfile(summary_path):
        with open(summary_path) as fh:
            previous = json.load(fh)
    return gen.codec.vae, gen.text_encoder.model, tokenizer, gen.denoiser, previous


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
_REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def reverse_spec(spec: S.SceneSpec) -> S.SceneSpec:
    """The spec of the time-reversed clip (constant velocities, so every motion reverses)."""
    return S.SceneSpec(tuple(replace(o, motion=_REVERSE.get(o.motion, o.motion)) for o in spec.objects), spec.relations)


def render_pool(n: int, seed: int, chunk: int = 256, progress: bool = True):
    videos, specs = [], []
    for start in tqdm(range(0, n, chunk), desc="render train clips", disable=not progress):
        batch = S.make_clips(min(chunk, n - start), split="train", seed=seed, start=start)
        videos.append((batch.videos * 255).round().to(torch.uint8))
        specs.extend(batch.specs)
    return torch.cat(videos), specs


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


# ------------------------------------------------------------------------------------------------------
# checkpoints (atomic: write a temporary directory, then rename)
# ------------------------------------------------------------------------------------------------------
def atomic_dir(path: str, write) -> None:
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_unet_state(path, unet, ema, optimizer, step, history, elapsed):
    from safetensors.torch import save_file

    def write(tmp):
        save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, os.path.join(tmp, "unet.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))  # tensors and numbers only
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump({"step": step, "history": history, "elapsed": elapsed}, fh)

    atomic_dir(path, write)


def load_unet_state(path, unet, ema, optimizer):
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(os.path.join(path, "unet.safetensors")))
    ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    return state["step"], state["history"], state["elapsed"]


# ------------------------------------------------------------------------------------------------------
# stage 1: the VAE
# ------------------------------------------------------------------------------------------------------
def train_vae(args, pool_videos, progress: bool):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(args.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    frames = pool_videos.flatten(0, 1)  # (N*T, 3, H, W) uint8
    history, start = [], 0
    ckpt = os.path.join(args.report_dir, "vae_checkpoint")
    if args.resume and os.path.isdir(ckpt):
        vae.load_state_dict(load_file(os.path.join(ckpt, "vae.safetensors")))
        optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True))
        with open(os.path.join(ckpt, "state.json")) as fh:
            state = json.load(fh)
        start, history = state["step"], state["history"]
        print(f"resumed VAE training at step {start}", flush=True)

    def write_checkpoint(tmp, step):
        save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, os.path.join(tmp, "vae.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))  # tensors and numbers only
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump({"step": step, "history": history}, fh)

    bar = tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="pretrain VAE", disable=not progress)
    for step in bar:
        rng = step_rng(args.seed, 1, step)
        idx = torch.from_numpy(rng.choice(len(frames), size=args.vae_batch, replace=False))
        x = frames[idx].float() / 127.5 - 1.0
        lr = args.vae_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))
        for g in optimizer.param_groups:
            g["lr"] = lr
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.from_numpy(rng.standard_normal(posterior.mean.shape).astype(np.float32))
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == args.vae_steps - 1:
            history.append({"step": step + 1, "rec": float(rec), "kl": float(kl)})
            bar.set_postfix(rec=f"{float(rec):.4f}", kl=f"{float(kl):.2f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.vae_steps:
            atomic_dir(ckpt, lambda tmp: write_checkpoint(tmp, step + 1))
    vae.eval().requires_grad_(False)
    # Unit-variance latents for the diffusion model (Stable Diffusion's scaling_factor, measured on the data).
    with torch.no_grad():
        sample = frames[torch.from_numpy(step_rng(args.seed, 3, 0).choice(len(frames), size=512, replace=False))]
        z = vae.encode(sample.float() / 127.5 - 1.0).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae, history


@torch.no_grad()
def encode_pool(codec: FrameVAECodec, pool_videos, progress: bool, chunk: int = 64) -> torch.Tensor:
    out = []
    for s in tqdm(range(0, len(pool_videos), chunk), desc="encode latents", disable=not progress):
        out.append(codec.encode(pool_videos[s:s + chunk].float() / 255.0))
    return torch.cat(out)  # (N, 4, T, 16, 16)


# ------------------------------------------------------------------------------------------------------
# stage 2: the UNet
# ------------------------------------------------------------------------------------------------------
def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(latents, specs, batch_size: int, cfg_drop: float, rng: np.random.Generator):
    idx = rng.choice(len(specs), size=batch_size, replace=False)
    x0, captions = [], []
    for i in idx:
        z, spec = latents[i], specs[i]
        if rng.random() < 0.5:  # time reversal is exact on per-frame latents
            reversed_spec = reverse_spec(spec)
            if S.split_of(reversed_spec) == "train":
                z, spec = z.flip(1), reversed_spec
        x0.append(z)
        captions.append("" if rng.random() < cfg_drop else S.caption_of(spec))
    return torch.stack(x0), captions


def denoising_loss(gen: VideoGenerator, unet, x0, captions, rng: np.random.Generator, gamma: float):
    """Epsilon-prediction MSE with min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR per sample."""
    b = x0.shape[0]
    t = torch.from_numpy(rng.integers(0, gen.num_train_timesteps, size=b))
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    x_t = gen.add_noise(x0, noise, t)
    text = gen.encode_text(captions)
    pred = gen.denoise(unet, x_t, t, text)
    ab = gen.alphas_cumprod[t]
    snr = ab / (1 - ab)
    weight = torch.clamp(snr, max=gamma) / snr
    per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
    return (weight * per_sample).mean(), per_sample.mean().detach()


# ------------------------------------------------------------------------------------------------------
# evaluation and pictures
# ------------------------------------------------------------------------------------------------------
def contact_sheet(videos: torch.Tensor, captions: list, path: str, title: str):
    """A PNG: one row per clip (its 8 frames side by side) under its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(captions)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.25 * n))
    axes = np.atleast_1d(axes)
    for ax, video, caption in zip(axes, videos, captions):
        strip = torch.cat(list(video.clamp(0, 1)), dim=-1).permute(1, 2, 0).numpy()
        ax.imshow(strip, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def vlm_scores(backbone, videos: torch.Tensor, captions: list) -> dict:
    text = backbone.encode_text(captions)
    video = backbone.encode_video(videos)
    return {"vlm_cosine": float((text.embed * video.embed).sum(-1).mean()),
            "vlm_match_prob": float(backbone.match_probability(text, video).mean())}


@torch.no_grad()
def sample_videos(gen: VideoGenerator, unet, prompts: list, args, guidance: float, seed: int, chunk: int = 16):
    out = []
    for s in range(0, len(prompts), chunk):
        g = torch.Generator().manual_seed(seed + s)
        out.append(gen.sample(unet, prompts[s:s + chunk], args.eval_steps, guidance_scale=guidance, generator=g))
    return torch.cat(out)


def summarize(result: dict) -> dict:
    keys = ["quality", "semantic", "total"] + [k for k in result if k not in ("raw", "per_clip", "num_clips", "quality",
                                                                                "semantic", "total")]
    return {k: (round(result[k], 4) if isinstance(result[k], float) else result[k]) for k in keys}


def evaluate(gen: VideoGenerator, unet, args, report_dir: str, progress: bool) -> dict:
    from pisces_fast.eval.analyzer import analyze
    from pisces_fast.rewards.backbones.internvideo2 import InternVideo2Backbone
    from pisces_fast.training.video_io import save_video_grid

    backbone = InternVideo2Backbone.from_pretrained(args.vlm).eval()
    metrics = {}
    n = args.eval_prompts
    for split in ("train", "heldout"):
        real = S.make_clips(n, split=split, seed=args.seed + 2000)
        prompts = real.captions
        t0 = time.time()
        fake = sample_videos(gen, unet, prompts, args, args.guidance, seed=args.seed + 3000)
        sample_time = time.time() - t0
        real_scores = summarize(analyze(real.videos, real.specs)) | vlm_scores(backbone, real.videos, prompts)
        fake_scores = summarize(analyze(fake, real.specs)) | vlm_scores(backbone, fake, prompts)
        metrics[split] = {"real": real_scores, "generated": fake_scores,
                          "sample_seconds_per_clip": round(sample_time / n, 3)}
        k = min(16, n)
        save_video_grid(torch.cat([real.videos[:k], fake[:k]]), os.path.join(report_dir, f"samples_{split}.gif"), ncol=k)
        contact_sheet(fake[:8], prompts[:8], os.path.join(report_dir, f"samples_{split}.png"),
                      f"generated, {split} prompts (DDIM {args.eval_steps}, guidance {args.guidance})")
        if progress:
            print(f"[eval] {split}: real {real_scores['total']:.3f} / generated {fake_scores['total']:.3f} total", flush=True)
    # classifier-free guidance sweep on a few held-out prompts (semantic vs quality trade-off)
    sweep = {}
    real = S.make_clips(min(16, n), split="heldout", seed=args.seed + 2000)
    for w in (1.0, 3.0, 5.0, 7.5):
        fake = sample_videos(gen, unet, real.captions, args, w, seed=args.seed + 3000)
        r = analyze(fake, real.specs)
        sweep[str(w)] = {k: round(r[k], 4) for k in ("quality", "semantic", "total")}
    metrics["guidance_sweep_heldout"] = sweep
    return metrics


def write_model_index(out: str):
    import diffusers

    index = {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=1)


def plot_curves(vae_history, unet_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if vae_history:
        axes[0].plot([h["step"] for h in vae_history], [h["rec"] for h in vae_history])
        axes[0].set_yscale("log")
    axes[0].set_title("VAE reconstruction (L1 + MSE)")
    axes[1].plot([h["step"] for h in unet_history], [h["mse"] for h in unet_history])
    axes[1].set_title("UNet epsilon MSE (running)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    os.makedirs(args.report_dir, exist_ok=True)
    channels = [int(c) for c in args.channels.split(",")]
    if not args.vae_only and not os.path.isfile(os.path.join(args.vlm, "config.json")):
        raise FileNotFoundError(f"--vlm {args.vlm}: no world VLM there; run scripts/pretrain_world_vlm.py first")
    timings = {}

    t0 = time.time()
    pool_videos, pool_specs = render_pool(args.pool_size, args.seed, progress=progress)
    timings["render_seconds"] = round(time.time() - t0, 1)

    # ---- stage 1: VAE (skipped on --resume when it is already done)
    from diffusers import AutoencoderKL

    vae_dir = os.path.join(args.report_dir, "vae")
    vae_history: list = []
    previous = None  # the continued generator's training summary (--init_from)
    if args.init_from:
        vae, bert, tokenizer, unet, previous = load_saved_generator(args.init_from)
        print(f"continuing {args.init_from}: its VAE, text encoder and UNet", flush=True)
    elif args.resume and os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        print(f"reusing the VAE in {vae_dir}", flush=True)
    else:
        t0 = time.time()
        vae, vae_history = train_vae(args, pool_videos, progress)
        vae_seconds = round(time.time() - t0, 1)

        def write_vae(tmp):
            vae.save_pretrained(tmp)
            with open(os.path.join(tmp, "vae_history.json"), "w") as fh:
                json.dump({"seconds": vae_seconds, "history": vae_history}, fh)

        atomic_dir(vae_dir, write_vae)
        shutil.rmtree(os.path.join(args.report_dir, "vae_checkpoint"), ignore_errors=True)
    if os.path.isfile(os.path.join(vae_dir, "vae_history.json")):
        with open(os.path.join(vae_dir, "vae_history.json")) as fh:
            saved = json.load(fh)
        timings["vae_seconds"], vae_history = saved["seconds"], saved["history"]
    codec = FrameVAECodec(vae)
    with torch.no_grad():
        probe = pool_videos[:64].float() / 255.0
        vae_l1 = float((codec.decode(codec.encode(probe)) - probe).abs().mean())
    print(f"VAE: scaling_factor {vae.config.scaling_factor:.3f}, reconstruction L1 {vae_l1:.4f} (in [0, 1])", flush=True)
    if args.vae_only:
        return

    # ---- stage 2: UNet
    if not args.init_from:
        bert, tokenizer = text_tower_from_vlm(args.vlm)
        torch.manual_seed(args.seed)
        unet = build_unet(channels, bert.config.hidden_size)
    text_encoder = TransformersTextEncoder(bert, tokenizer, TEXT_MAX_LENGTH)
    ema = build_unet([int(c) for c in unet.config.block_out_channels], bert.config.hidden_size)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False).eval()
    gen = VideoGenerator("unet3d", unet, build_scheduler(), codec, text_encoder, NUM_FRAMES, SIZE, SIZE)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet: {n_params / 1e6:.2f}M parameters over latents {gen.latent_shape(1)[1:]}", flush=True)
    t0 = time.time()
    latents = encode_pool(codec, pool_videos, progress)
    timings["encode_seconds"] = round(time.time() - t0, 1)
    del pool_videos

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ckpt_dir = os.path.join(args.report_dir, "checkpoint")
    step, history, elapsed = 0, [], 0.0
    if args.resume and os.path.isdir(ckpt_dir):
        step, history, elapsed = load_unet_state(ckpt_dir, unet, ema, optimizer)
        print(f"resumed UNet training at step {step}", flush=True)
    unet.train()
    running = None
    t_start = time.time() - elapsed
    bar = tqdm(total=args.steps, initial=step, desc="pretrain UNet", disable=not progress)
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    while step < args.steps:
        rng = step_rng(args.seed, 2, step)
        x0, captions = make_batch(latents, pool_specs, args.batch_size, args.cfg_drop, rng)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        loss, mse = denoising_loss(gen, unet, x0, captions, rng, args.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten quickly
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        running = float(mse) if running is None else 0.95 * running + 0.05 * float(mse)
        if step % 10 == 0 or step == args.steps:
            history.append({"step": step, "mse": round(running, 5)})
            bar.set_postfix(mse=f"{running:.4f}")
        bar.update(1)
        if step % args.save_every == 0 and step < args.steps:
            save_unet_state(ckpt_dir, unet, ema, optimizer, step, history, time.time() - t_start)
    bar.close()
    timings["unet_seconds"] = round(time.time() - t_start, 1)
    print(f"UNet: {args.steps} steps in {timings['unet_seconds']:.0f}s", flush=True)

    # ---- save (EMA weights) in diffusers layout
    gen.denoiser = ema
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    # float16 storage keeps the shipped world under its 20 MB budget (loaded back as float32); the
    # evaluation below runs on the same rounded weights.
    ema.half().save_pretrained(os.path.join(args.out, "unet"))
    ema.float()
    gen.scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    vae.save_pretrained(os.path.join(args.out, "vae"))
    bert.save_pretrained(os.path.join(args.out, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(args.out, "tokenizer"))
    write_model_index(args.out)
    with open(os.path.join(args.out, "pisces_generator.json"), "w") as fh:
        json.dump({"num_frames": NUM_FRAMES, "height": SIZE, "width": SIZE, "text_max_length": TEXT_MAX_LENGTH}, fh)

    t0 = time.time()
    metrics = evaluate(gen, ema, args, args.report_dir, progress)
    timings["eval_seconds"] = round(time.time() - t0, 1)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    command = " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
    previous = previous or {}
    stages = previous.get("stages", [previous["command"]] if previous else []) + [command]
    steps_before = previous.get("total_unet_steps", previous.get("args", {}).get("steps", 0))
    summary = {
        "command": command,
        "stages": stages,
        "total_unet_steps": int(steps_before) + args.steps,
        "unet_parameters": n_params,
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in bert.parameters()),
        "vae_reconstruction_l1": round(vae_l1, 5),
        "timings": timings,
        "size_bytes": size,
        "final_mse": history[-1]["mse"] if history else None,
        "metrics": metrics,
        "args": vars(args),
    }
    with open(os.path.join(args.out, "training_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.report_dir, "metrics.json"), "w") as fh:
        json.dump(summary | {"history": history, "vae_history": vae_history}, fh, indent=1)
    plot_curves(vae_history, history, os.path.join(args.report_dir, "curves.png"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(json.dumps(metrics, indent=1))
    for split in ("train", "heldout"):
        m = metrics[split]
        print(f"{split}: real Q/S/T {m['real']['quality']:.3f}/{m['real']['semantic']:.3f}/{m['real']['total']:.3f}  "
              f"generated {m['generated']['quality']:.3f}/{m['generated']['semantic']:.3f}/{m['generated']['total']:.3f}")
    print(f"saved {args.out} ({size / 1e6:.2f} MB); timings {timings}", flush=True)


if __name__ == "__main__":
    main()
