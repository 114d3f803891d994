"""The few-step student: guidance (w) conditioning (C2), the consistency sampler (C1) checked against diffusers'
LCMScheduler / FlowMatchEulerDiscreteScheduler step by step, and the exported student reproduced by the stock
TextToVideoSDPipeline + LCMScheduler (w folded into linear_1's bias)."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_layouts import TINY_SIZES, save_tiny_modelscope  # noqa: E402

import pisces_fast  # noqa: E402
from pisces_fast.training import lora as L  # noqa: E402
from pisces_fast.training.config import load_config  # noqa: E402
from pisces_fast.training.generators import build_tiny_generator, load_generator  # noqa: E402
from pisces_fast.training.sampling import flow_consistency_step, lcm_step, lcm_timesteps  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


def test_guidance_embedding_is_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    s = torch.tensor([1.0, 6.0, 8.5, 16.0])
    for dim in (256, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, s - 1, embedding_dim=dim)
        assert torch.equal(L.guidance_scale_embedding(s, dim), ref)


def test_lcm_sampler_steps_equal_lcmscheduler():
    from diffusers import LCMScheduler

    gen = build_tiny_generator("unet3d")
    assert lcm_timesteps(gen, 4).tolist() == [999, 759, 499, 259]  # LCM's 4-step schedule on the 50-step grid
    for n in (1, 2, 4, 8):
        sched = LCMScheduler.from_config(gen.scheduler.config)
        sched.set_timesteps(n)
        ts = lcm_timesteps(gen, n).tolist()
        assert ts == sched.timesteps.tolist()
        torch.manual_seed(n)
        x = torch.randn(2, 4, 3, 8, 8)
        ours = x.clone()
        g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for i, t in enumerate(ts):
            eps = torch.randn_like(x)
            out = sched.step(eps, t, x, generator=g_ref)
            last = i == len(ts) - 1
            noise = None if last else torch.randn(x.shape, generator=g_ours)
            ours, denoised = lcm_step(gen, ours, eps, t, None if last else ts[i + 1], noise)
            torch.testing.assert_close(denoised, out.denoised, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours, out.prev_sample, rtol=1e-5, atol=1e-5)
            x = out.prev_sample


def test_flow_consistency_steps_equal_stochastic_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sched.set_timesteps(4)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 4, 4)
    ours = x.clone()
    sig = sched.sigmas
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn_like(x)
        x = sched.step(v, t, x, generator=g_ref).prev_sample
        noise = torch.randn(ours.shape, generator=g_ours)
        ours, _ = flow_consistency_step(ours, v, sig[i], sig[i + 1], noise)
        torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_guidance_projection_is_zero_initialised_per_adapter_and_disabled_for_the_teacher():
    gen = build_tiny_generator("unet3d", num_frames=2)
    gen.denoiser.eval()  # UNet3D's dropout would draw random numbers
    torch.manual_seed(0)
    x, t = torch.randn(gen.latent_shape(1)), torch.tensor([500])
    text = gen.encode_text(["a red square"])
    with torch.no_grad():
        base = gen.denoise(gen.denoiser, x, t, text)
    assert not gen.w_conditioned
    gen.enable_guidance_conditioning(64)
    with torch.no_grad():
        assert torch.equal(gen.denoise(gen.denoiser, x, t, text, guidance=8.0), base)  # zero init: the teacher
    L.add_lora(gen.denoiser, 2, 2, ["to_q", "to_v"])
    L.add_lora(gen.denoiser, 2, 2, ["to_q", "to_v"], adapter_name=L.EMA_ADAPTER)
    assert gen.w_conditioned and gen.denoiser.config.time_cond_proj_dim == 64
    trainable = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    assert "time_embedding.cond_proj.lora_w.default.weight" in trainable
    assert "time_embedding.cond_proj.lora_w.ema_target.weight" not in trainable
    assert L.GUIDANCE_KEY in L.lora_state_dict(gen.denoiser) and L.GUIDANCE_KEY in L.lora_state_dict(gen.denoiser, L.EMA_ADAPTER)
    with torch.no_grad():
        with_lora = gen.denoise(gen.denoiser, x, t, text)  # zero-B LoRA: the base up to peft's float path (~1e-6)
        torch.testing.assert_close(with_lora, base, rtol=0, atol=1e-5)
        assert torch.equal(gen.denoise(gen.denoiser, x, t, text, guidance=8.0), with_lora)
        torch.nn.init.normal_(gen.denoiser.time_embedding.cond_proj.lora_w["default"].weight, std=0.05)
        w8 = gen.denoise(gen.denoiser, x, t, text, guidance=8.0)
        w12 = gen.denoise(gen.denoiser, x, t, text, guidance=12.0)
        assert float((w8 - w12).abs().max()) > 1e-4 and float((w8 - base).abs().max()) > 1e-4
        with L.adapter_disabled(gen.denoiser):  # no LoRA, no w: the base model (through peft's layers), CFG again
            assert torch.equal(gen.denoise(gen.denoiser, x, t, text, guidance=8.0), with_lora)
            assert not gen.w_conditioned
        with L.active_adapter(gen.denoiser, L.EMA_ADAPTER):  # the EMA copy is still zero
            assert torch.equal(gen.denoise(gen.denoiser, x, t, text, guidance=8.0), with_lora)


def _cd_config(tmp_path, arch, **cd):
    return load_config(os.path.join(ROOT, "configs", "tiny_cd.yaml"), {
        "deepspeed": None, "output_dir": str(tmp_path / "run"), "export_lora": False, "validation": {"every": 0},
        "model": {"tiny": arch, "num_frames": 2}, "reward": {"kind": "none"},
        "cd": {"guidance_conditioning": True, "guidance_scale_min": 6.0, "guidance_scale_max": 16.0, "ema_decay": None, **cd}})


def test_cd_step_trains_the_guidance_projection_with_the_lora(tmp_path):
    from pisces_fast.training.modes import ConsistencyDistillation

    cfg = _cd_config(tmp_path, "unet3d", guidance_embedding_dim=32)
    gen = build_tiny_generator("unet3d", num_frames=2)
    gen.enable_guidance_conditioning(cfg.cd.guidance_embedding_dim)
    L.add_lora(gen.denoiser, 2, 2, ["to_q", "to_v"])
    mode = ConsistencyDistillation(gen, gen.denoiser, gen.denoiser, cfg, None)
    torch.manual_seed(0)
    z0 = torch.rand(2, *gen.latent_shape(1)[1:]) * 2 - 1
    loss, pred, metrics = mode.cd_terms(z0, ["a red square", "a blue circle"])
    assert 6.0 <= metrics["guidance_scale"] <= 16.0
    loss.backward()
    grad = gen.denoiser.time_embedding.cond_proj.lora_w["default"].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_hunyuan_student_takes_w_in_one_pass_and_wan_refuses_w_conditioning(tmp_path):
    calls = []

    def counting(gen):
        def forward(**kw):
            calls.append(kw["hidden_states" if "hidden_states" in kw else "sample"].shape[0])
            return gen.denoiser(**kw)
        return forward

    hy = build_tiny_generator("hunyuan", num_frames=2)
    assert hy.w_conditioned
    hy.sample(counting(hy), ["a red square"], 2, guidance_scale=5.0, sampler="consistency")
    assert calls == [1, 1]  # w is the transformer's guidance input: one pass per step
    calls.clear()
    wan = build_tiny_generator("wan", num_frames=2)
    wan.sample(counting(wan), ["a red square"], 2, guidance_scale=5.0, sampler="consistency")
    assert calls == [2, 2]  # CFG: cond and uncond batched
    with pytest.raises(ValueError, match="WanTransformer3DModel has no guidance"):
        wan.enable_guidance_conditioning()
    with pytest.raises(ValueError, match="cd.guidance_conditioning"):
        _cd_config(tmp_path, "wan")
    with pytest.raises(ValueError, match="validation.sampler"):
        load_config(None, {"model": {"tiny": "unet3d"}, "validation": {"sampler": "euler"}})
    with pytest.raises(ValueError, match="sampler"):
        hy.sample(hy.denoiser, ["x"], 2, sampler="lcm")


def test_exported_student_reproduced_by_stock_pipeline_with_lcm_scheduler(tmp_path):
    """A w-conditioned UNet3D student with a LoRA -> pytorch_lora_weights.safetensors -> load_lora(pipe, dir,
    guidance_scale=s) -> TextToVideoSDPipeline + LCMScheduler at guidance_scale 1 gives the frames of the project's
    consistency sampler at w = s (same latents, same generator). Tolerance 1e-5 on [0, 1] pixels (measured ~3e-7:
    folding reassociates linear_1(t_emb + c) into linear_1(t_emb) + linear_1(c))."""
    from diffusers import LCMScheduler, TextToVideoSDPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = save_tiny_modelscope(str(tmp_path / "modelscope"))
    size = TINY_SIZES["modelscope"]
    gen = load_generator(layout, **size)
    gen.enable_guidance_conditioning(32)
    L.add_lora(gen.denoiser, 2, 2, ["to_q", "to_k", "to_v", "to_out.0"], init="gaussian")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in L.lora_parameters(gen.denoiser):
            p.normal_(std=0.1)
    state = L.lora_state_dict(gen.denoiser)
    out_dir = L.export_diffusers_lora(state, "unet3d", str(tmp_path / "lora"), {"rank": 2, "alpha": 2,
                                      "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    prompts, s, steps = ["a red cat runs left", "blue square"], 9.0, 4
    latents = torch.randn(gen.latent_shape(2))
    gen.denoiser.eval()
    mine = gen.sample(gen.denoiser, prompts, steps, s, generator=torch.Generator().manual_seed(5), sampler="consistency",
                      latents=latents.clone())
    other_w = gen.sample(gen.denoiser, prompts, steps, 3.0, generator=torch.Generator().manual_seed(5),
                         sampler="consistency", latents=latents.clone())
    assert float((mine - other_w).abs().max()) > 1e-3  # w matters

    pipe = TextToVideoSDPipeline.from_pretrained(layout)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="guidance_scale"):
        pisces_fast.load_lora(TextToVideoSDPipeline.from_pretrained(layout), os.path.dirname(out_dir))
    pisces_fast.load_lora(pipe, os.path.dirname(out_dir), guidance_scale=s)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(), output_type="pt",
               generator=torch.Generator().manual_seed(5), **size).frames
    assert float((torch.as_tensor(ref) - mine).abs().max()) < 1e-5

    # merged: a plain UNet3D with time_cond_proj_dim, whose cond_proj holds the trained projection
    L.merge_lora(gen.denoiser)
    assert type(gen.denoiser.time_embedding.cond_proj) is torch.nn.Linear and gen.denoiser.config.time_cond_proj_dim == 32
    merged = gen.sample(gen.denoiser, prompts, steps, s, generator=torch.Generator().manual_seed(5), sampler="consistency",
                        latents=latents.clone())
    assert float((merged - mine).abs().max()) < 1e-5


def test_train_exports_w_projection_and_validates_with_consistency_sampler(tmp_path):
    """train.py's path: cd.guidance_conditioning adds the projection before the LoRA, the optimizer trains it, the
    diffusers export carries it as unet.time_embedding.cond_proj.weight, validation uses validation.sampler."""
    from safetensors.torch import load_file

    from pisces_fast.training.trainer import Trainer

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cd.yaml"), {
        "deepspeed": None, "output_dir": str(tmp_path / "run"), "max_steps": 2, "checkpoint_every": 0,
        "model": {"tiny": "unet3d", "num_frames": 2}, "reward": {"kind": "none"}, "optim": {"lr": 1e-2},
        "validation": {"every": 2, "sampler": "consistency", "num_steps": 2, "guidance_scale": 8.0},
        "cd": {"guidance_conditioning": True, "guidance_embedding_dim": 16, "guidance_scale_min": 6.0,
               "guidance_scale_max": 16.0}})
    tr = Trainer(cfg)
    proj = tr.gen.denoiser.time_embedding.cond_proj.lora_w
    assert set(proj) == {"default", "ema_target"}
    out = tr.train()
    assert float(proj["default"].weight.detach().abs().max()) > 0  # trained away from its zero init
    exported = load_file(out["lora_diffusers"])
    torch.testing.assert_close(exported["unet.time_embedding.cond_proj.weight"], proj["default"].weight.detach())
    assert os.path.isfile(os.path.join(cfg.output_dir, "validation", f"step-00000002.{cfg.validation.format}"))
