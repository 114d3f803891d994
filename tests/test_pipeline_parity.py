"""Conditioning and sampling parity with the stock diffusers pipelines, on tiny random models in the real layouts.

What a LoRA trained here sees must be what it sees in `TextToVideoSDPipeline` / `WanPipeline` /
`HunyuanVideoPipeline`: the prompt embeddings (and pooled vector / mask) equal the pipeline's `encode_prompt`
exactly, and the project's samplers give the pipeline's frames for the same latents and scheduler settings
(float tolerance: batched vs separate CFG passes reorder float sums; measured max |diff| <= 6e-7 on [0, 1] pixels).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_layouts import TINY_SIZES, save_all_tiny_layouts  # noqa: E402

from pisces_fast.training.generators import DEFAULT_TEXT_MAX_LENGTH, PipelineTextEncoder, load_generator  # noqa: E402

PIPELINES = {"modelscope": "TextToVideoSDPipeline", "wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline"}
PROMPTS = ["a red cat runs left", "blue square"]
PIXEL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return save_all_tiny_layouts(str(tmp_path_factory.mktemp("layouts")))


def stock_pipeline(family, directory, scheduler=None):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "consistency":
        if family == "modelscope":
            pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                                   stochastic_sampling=True)
    return pipe


@pytest.mark.parametrize("family", ["modelscope", "wan", "hunyuan"])
def test_prompt_embeddings_equal_stock_encode_prompt(family, layouts):
    gen = load_generator(layouts[family], **TINY_SIZES[family])
    te = gen.text_encoder
    assert isinstance(te, PipelineTextEncoder) and te.family == family
    assert te.max_length == DEFAULT_TEXT_MAX_LENGTH[family]
    pipe = stock_pipeline(family, layouts[family])
    assert type(te.text_encoder) is type(pipe.text_encoder)  # the class the pipeline loads (UMT5EncoderModel for Wan)
    c = gen.encode_text(PROMPTS)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode changes SDPA's kernel choice)
        if family == "modelscope":
            ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
            assert c.embeds.shape == (2, 77, 16) and bool(c.mask.all())
        elif family == "wan":
            ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
            assert c.embeds.shape[1] == 512
            assert bool((c.embeds[~c.mask] == 0).all()) and bool((c.embeds[c.mask].abs().sum(-1) > 0).all())
        else:
            ref, pooled, mask = pipe.encode_prompt(PROMPTS, device="cpu")
            assert torch.equal(c.pooled, pooled) and torch.equal(c.mask, mask.bool())
            assert c.embeds.shape[1] == 256 and type(te.text_encoder_2).__name__ == "CLIPTextModel"
        assert torch.equal(c.embeds, ref)
        assert not torch.equal(c.embeds[0], c.embeds[1])  # the prompt survives the template crop / padding


@pytest.mark.parametrize("family", ["modelscope", "wan", "hunyuan"])
@pytest.mark.parametrize("sampler", ["ddim", "consistency"])
def test_sampler_equals_stock_pipeline(family, sampler, layouts):
    """sampler ddim = the pipeline with its DDIM / FlowMatchEuler scheduler; consistency = with LCMScheduler /
    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), the same fresh noise (generator for ModelScope,
    global RNG for Wan / Hunyuan, whose pipelines do not pass their generator to scheduler.step)."""
    size = TINY_SIZES[family]
    gen = load_generator(layouts[family], **size)
    pipe = stock_pipeline(family, layouts[family], sampler)
    torch.manual_seed(0)
    latents = torch.randn(gen.latent_shape(len(PROMPTS)))
    steps, scale = 3, 4.0

    def generator():
        return torch.Generator().manual_seed(5) if family == "modelscope" else None

    torch.manual_seed(7)
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale, latents=latents.clone(), output_type="pt",
               generator=generator(), **size).frames
    torch.manual_seed(7)
    mine = gen.sample(gen.denoiser, PROMPTS, steps, scale, generator=generator(), sampler=sampler, latents=latents.clone())
    ref = torch.as_tensor(ref)
    assert ref.shape == mine.shape == (2, size["num_frames"], 3, size["height"], size["width"])
    assert float((ref - mine).abs().max()) < PIXEL_TOL
    if sampler == "consistency":  # the fresh noise matters: another stream gives other frames
        torch.manual_seed(8)
        other = gen.sample(gen.denoiser, PROMPTS, steps, scale, sampler=sampler, latents=latents.clone(),
                           generator=torch.Generator().manual_seed(6) if family == "modelscope" else None)
        assert float((ref - other).abs().max()) > 1e-3


def test_text_max_length_follows_family_and_can_be_set(layouts):
    gen = load_generator(layouts["wan"], text_max_length=32, **TINY_SIZES["wan"])
    assert gen.encode_text(PROMPTS).embeds.shape[1] == 32
    with pytest.raises(ValueError, match="model.text_max_length"):
        load_generator(layouts["modelscope"], text_max_length=16, **TINY_SIZES["modelscope"])


def test_hunyuan_layout_without_text_encoder_2_is_refused(layouts, tmp_path):
    import shutil

    broken = tmp_path / "hunyuan"
    shutil.copytree(layouts["hunyuan"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_generator(str(broken), **TINY_SIZES["hunyuan"])


def test_wan_unipc_scheduler_is_sampled_as_flow_match_euler_with_its_shift(layouts, tmp_path):
    """Wan2.1 ships UniPCMultistepScheduler(use_flow_sigmas, flow_shift): loaded as FlowMatchEuler with that shift."""
    import json
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    wan = tmp_path / "wan"
    shutil.copytree(layouts["wan"], wan)
    shutil.rmtree(wan / "scheduler")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0).save_pretrained(
        str(wan / "scheduler"))
    gen = load_generator(str(wan), **TINY_SIZES["wan"])
    assert isinstance(gen.scheduler, FlowMatchEulerDiscreteScheduler) and gen.scheduler.config.shift == 5.0
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(4)
    assert torch.equal(gen.flow_sigmas(4), ref.sigmas.float())
    cfg = json.loads((wan / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"], cfg["use_flow_sigmas"] = "epsilon", False
    (wan / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        load_generator(str(wan), **TINY_SIZES["wan"])
