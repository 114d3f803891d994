"""LoRA on tiny diffusers denoisers: export loads into diffusers, merge, generator directories, checkpoint pieces."""
import os
import random

import numpy as np
import pytest
import torch

from pisces_fast.training import lora as L
from pisces_fast.training.checkpoint import load_rng, save_rng
from pisces_fast.training.generators import build_tiny_generator, load_generator, save_generator

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def _randomise_lora(den):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in L.lora_parameters(den):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _inputs(gen, arch):
    torch.manual_seed(0)
    x = torch.randn(gen.latent_shape(2))
    t = torch.tensor([700, 20]) if arch == "unet3d" else torch.tensor([0.7, 0.2])
    return x, t, gen.encode_text(["a red square moving right", "a blue circle"])


@pytest.mark.parametrize("arch", ["unet3d", "wan", "hunyuan"])
def test_exported_lora_loads_into_plain_diffusers_model(arch, tmp_path):
    gen = build_tiny_generator(arch)
    base_state = {k: v.clone() for k, v in gen.denoiser.state_dict().items()}
    L.add_lora(gen.denoiser, 4, 8, TARGETS)
    _randomise_lora(gen.denoiser)
    x, t, c = _inputs(gen, arch)
    with torch.no_grad():
        want = gen.denoise(gen.denoiser, x, t, c)
        with L.adapter_disabled(gen.denoiser):
            base = gen.denoise(gen.denoiser, x, t, c)
    assert (want - base).abs().max() > 1e-4  # the adapter really changes the output
    path = L.export_diffusers_lora(L.lora_state_dict(gen.denoiser), arch, str(tmp_path / "lora"),
                                   {"rank": 4, "alpha": 8, "target_modules": TARGETS})
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    fresh = build_tiny_generator(arch)  # same seed -> same base weights, no LoRA
    fresh.denoiser.load_state_dict(base_state)
    L.load_diffusers_lora_into_denoiser(fresh.denoiser, arch, str(tmp_path / "lora"))
    with torch.no_grad():
        got = fresh.denoise(fresh.denoiser, x, t, c)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_pipeline_loader_reads_wan_export(tmp_path):
    """WanPipeline.load_lora_weights = lora_state_dict + load_lora_into_transformer: call that path on the class."""
    from diffusers import WanPipeline
    from diffusers.loaders import WanLoraLoaderMixin

    gen = build_tiny_generator("wan")
    L.add_lora(gen.denoiser, 4, 4, TARGETS)
    _randomise_lora(gen.denoiser)
    L.export_diffusers_lora(L.lora_state_dict(gen.denoiser), "wan", str(tmp_path),
                            {"rank": 4, "alpha": 4, "target_modules": TARGETS})
    state = WanPipeline.lora_state_dict(str(tmp_path))
    assert all(k.startswith("transformer.") for k in state)

    class Holder(WanLoraLoaderMixin):  # WanPipeline's loader without the UMT5 encoder and VAE around it
        hf_device_map = None

        def __init__(self):
            self.transformer = build_tiny_generator("wan").denoiser
            self.components = {"transformer": self.transformer}

    holder = Holder()
    holder.load_lora_weights(str(tmp_path))
    x, t, c = _inputs(gen, "wan")
    with torch.no_grad():
        torch.testing.assert_close(gen.denoise(holder.transformer, x, t, c), gen.denoise(gen.denoiser, x, t, c),
                                   rtol=1e-4, atol=1e-5)


def test_ours_roundtrip_and_merge(tmp_path):
    gen = build_tiny_generator("unet3d")
    L.add_lora(gen.denoiser, 4, 4, TARGETS)
    _randomise_lora(gen.denoiser)
    state = L.lora_state_dict(gen.denoiser)
    L.save_lora(str(tmp_path / "l.safetensors"), state, {"rank": 4})
    back, meta = L.read_lora(str(tmp_path / "l.safetensors"))
    assert meta == {"rank": 4} and all(torch.equal(back[k], state[k]) for k in state)
    x, t, c = _inputs(gen, "unet3d")
    with torch.no_grad():
        want = gen.denoise(gen.denoiser, x, t, c)
        L.merge_lora(gen.denoiser)
        assert not any("lora_" in n for n, _ in gen.denoiser.named_parameters())
        torch.testing.assert_close(gen.denoise(gen.denoiser, x, t, c), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="missing keys"):
        g2 = build_tiny_generator("unet3d")
        L.add_lora(g2.denoiser, 4, 4, ["to_q"])
        L.load_lora_state_dict(g2.denoiser, state)
    with pytest.raises(ValueError, match="no module named"):
        L.add_lora(build_tiny_generator("unet3d").denoiser, 4, 4, ["not_a_layer"])
    with pytest.raises(FileNotFoundError):
        L.read_lora(str(tmp_path / "missing.safetensors"))


def test_ema_adapter_is_frozen_and_switchable():
    gen = build_tiny_generator("unet3d")
    L.add_lora(gen.denoiser, 4, 4, TARGETS)
    L.add_lora(gen.denoiser, 4, 4, TARGETS, adapter_name=L.EMA_ADAPTER)
    assert all(p.requires_grad for _, p in L.lora_parameters(gen.denoiser))
    assert not any(p.requires_grad for _, p in L.lora_parameters(gen.denoiser, L.EMA_ADAPTER))
    _randomise_lora(gen.denoiser)
    x, t, c = _inputs(gen, "unet3d")
    with torch.no_grad():
        with L.active_adapter(gen.denoiser, L.EMA_ADAPTER):
            ema_out = gen.denoise(gen.denoiser, x, t, c)
        with L.adapter_disabled(gen.denoiser):
            base = gen.denoise(gen.denoiser, x, t, c)
        torch.testing.assert_close(ema_out, base)  # EMA adapter still zero-initialised (B = 0)
        L.ema_update(gen.denoiser, 0.0)  # decay 0: copy the student
        with L.active_adapter(gen.denoiser, L.EMA_ADAPTER):
            torch.testing.assert_close(gen.denoise(gen.denoiser, x, t, c), gen.denoise(gen.denoiser, x, t, c))


@pytest.mark.parametrize("arch,vae", [("unet3d", "tiny_kl"), ("wan", "pixel")])
def test_generator_directory_roundtrip(arch, vae, tmp_path):
    gen = build_tiny_generator(arch, vae, num_frames=4)
    save_generator(gen, str(tmp_path / "model"))
    assert os.path.isdir(tmp_path / "model" / ("unet" if arch == "unet3d" else "transformer"))
    back = load_generator(str(tmp_path / "model"), num_frames=4)
    assert back.arch == arch and type(back.codec) is type(gen.codec)
    x, t, c = _inputs(gen, arch)
    with torch.no_grad():
        torch.testing.assert_close(back.denoise(back.denoiser, x, t, back.encode_text(["a red square moving right", "a blue circle"])),
                                   gen.denoise(gen.denoiser, x, t, c))
    video = torch.rand(1, 4, 3, 16, 16)
    z = back.encode_video(video)
    assert z.shape == back.latent_shape(1)
    assert back.decode_latents(z, num_frames=2).shape == (1, 2, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="unet/ or transformer/"):
        load_generator(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_generator(str(tmp_path / "nope"))


def test_rng_state_roundtrip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_rng(str(tmp_path), 0)
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng(str(tmp_path), 0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want
    from pisces_fast.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="rank 1"):
        load_rng(str(tmp_path), 1)


@pytest.mark.parametrize("family,arch,pipeline", [("modelscope", "unet3d", "TextToVideoSDPipeline"),
                                                  ("wan", "wan", "WanPipeline"),
                                                  ("hunyuan", "hunyuan", "HunyuanVideoPipeline")])
def test_load_lora_into_stock_pipeline_equals_merged_model(family, arch, pipeline, tmp_path):
    """pisces_fast.load_lora(pipe, dir) (peft on pipe.unet for TextToVideoSDPipeline, pipe.load_lora_weights for Wan /
    Hunyuan) -> the stock pipeline's frames equal the project's sampler on the LoRA-merged model (same latents)."""
    import sys
    import warnings

    import diffusers

    import pisces_fast

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_layouts import SAVERS, TINY_SIZES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = SAVERS[family](str(tmp_path / family))
    size = TINY_SIZES[family]
    gen = load_generator(layout, **size)
    gen.denoiser.eval()
    L.add_lora(gen.denoiser, 4, 8, TARGETS)
    _randomise_lora(gen.denoiser)
    L.export_diffusers_lora(L.lora_state_dict(gen.denoiser), arch, str(tmp_path / "lora"),
                            {"rank": 4, "alpha": 8, "target_modules": TARGETS})
    L.merge_lora(gen.denoiser)
    prompts, steps, scale = ["a red cat runs left", "blue square"], 2, 3.0
    torch.manual_seed(0)
    latents = torch.randn(gen.latent_shape(2))
    merged = gen.sample(gen.denoiser, prompts, steps, scale, latents=latents.clone())

    pipe = getattr(diffusers, pipeline).from_pretrained(layout)
    pipe.set_progress_bar_config(disable=True)
    base = torch.as_tensor(pipe(prompts, num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(),
                                output_type="pt", **size).frames)
    assert pisces_fast.load_lora(pipe, str(tmp_path / "lora")) is pipe
    got = torch.as_tensor(pipe(prompts, num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(),
                               output_type="pt", **size).frames)
    assert float((base - merged).abs().max()) > 1e-3  # the LoRA changes the frames
    torch.testing.assert_close(got, merged, rtol=0, atol=1e-4)
    if arch == "unet3d":
        with pytest.raises(ValueError, match="already holds a LoRA"):
            pisces_fast.load_lora(pipe, str(tmp_path / "lora"))
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        pisces_fast.load_lora(pipe, str(tmp_path))
