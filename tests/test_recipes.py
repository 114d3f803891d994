"""The real recipes (configs/recipes) and the memory plan before the GPUs (`train.py --dry_run`).

- every shipped recipe parses and validates; a placeholder left unfilled is refused with the field's name;
- the memory-plan arithmetic against hand counts: ZeRO partitioning, autograd's saved tensors, fused attention,
  LoRA parameter counts on a tiny model;
- `--dry_run` builds every shipped recipe's real architecture on the meta device and prints its plan;
- tiny random models saved in every real diffusers layout (tests/tiny_layouts.py) train through train.py from
  the shipped recipe files, with the paths swapped for tiny ones and the sizes reduced by overrides.
"""
import glob
import json
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from tiny_layouts import TINY_SIZES, save_all_tiny_layouts  # noqa: E402

from pisces_fast.training import memory_plan as mp  # noqa: E402
from pisces_fast.training.config import load_config, placeholder_fields  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))
FAMILIES = {"modelscope": "modelscope", "wan2.1_1.3b": "wan", "hunyuanvideo": "hunyuan"}
MODES = ("pisces_cd", "grpo", "dpo")

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(family: str, mode: str) -> str:
    return os.path.join(ROOT, "configs", "recipes", f"{family}_{mode}.yaml")


def test_every_family_and_mode_is_shipped():
    assert sorted(RECIPES) == sorted(recipe(f, m) for f in FAMILIES for m in MODES)
    for name in ("ds_zero2.json", "ds_zero3.json"):
        ds = json.load(open(os.path.join(ROOT, "configs", name)))
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == int(name[7])
        # micro-batch / accumulation / clipping come from the recipe (one source of truth)
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_validates_and_names_unfilled_placeholders(path):
    cfg = load_config(path, {"dry_run": True})
    assert cfg.optim.lr == 1e-6 and cfg.data.batch_size == 1 and cfg.lora.rank == 64
    assert cfg.optim.grad_accum == (16 if cfg.mode == "dpo" else 32)
    assert cfg.model.dtype == "bfloat16" and os.path.isdir(cfg.resolve_path(cfg.model.reference_config))
    assert json.load(open(cfg.resolve_path(cfg.deepspeed)))["bf16"]["enabled"]
    unfilled = [name for name, _ in placeholder_fields(cfg)]
    assert "model.path" in unfilled and "data.path" in unfilled
    if cfg.reward.kind == "pisces":
        assert {"reward.backbone.checkpoint", "reward.backbone.tokenizer", "reward.ot_map"} <= set(unfilled)
    with pytest.raises(ValueError, match=r"config `model\.path`: placeholder .* is not filled in"):
        load_config(path)
    with pytest.raises(ValueError, match=r"config `data\.path`: placeholder"):
        load_config(path, {"model": {"path": ROOT}})


# ----------------------------------------------------------------------------------------------------------
# the plan's arithmetic against hand counts


def test_zero_partitioning_hand_counts():
    frozen, trainable, ema = 1000, 64, 64
    for stage, n in ((0, 4), (1, 4), (2, 4), (3, 4), (2, 1)):
        got = mp.engine_memory(frozen, trainable, ema, stage, n, weight_bytes=2)
        assert got["weights"] == 2 * (frozen + trainable + ema) / (n if stage == 3 else 1)
        assert got["grads"] == 2 * trainable / (n if stage >= 2 else 1)
        assert got["optimizer"] == 12 * trainable / (n if stage >= 1 else 1)
    plain = mp.engine_memory(frozen, trainable, 0, 0, 1, weight_bytes=4, deepspeed=False)
    assert plain == {"weights": 4 * 1064, "grads": 4 * 64, "optimizer": 8 * 64}
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 100, "allgather_bucket_size": 10}}
    assert mp.deepspeed_buffers(ds, trainable=50, total=1000) == 2 * (50 + 10)
    ds3 = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 100, "stage3_max_live_parameters": 1e9}}
    assert mp.deepspeed_buffers(ds3, trainable=50, total=1000) == 2 * (100 + 1000)
    with pytest.raises(ValueError, match="zero stage"):
        mp.engine_memory(1, 1, 0, 4, 8, 2)


def test_saved_tensor_accounting_hand_count():
    """Frozen Linear(4->8) -> GELU -> trainable Linear(8->3), batch 5, float32.

    Input without grad: nothing before the trainable Linear needs a gradient, so autograd keeps only that Linear's
    input (5x8) for its weight gradient. Input with grad (the reward's case: gradients flow to the video): GELU's
    input (5x8) as well. Parameters (needed for the input gradients) are not activations and are not counted."""
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    net[0].requires_grad_(False)
    assert mp.saved_bytes(lambda: net(torch.randn(5, 4)), (net,)) == 5 * 8 * 4
    x = torch.randn(5, 4, requires_grad=True)
    assert mp.saved_bytes(lambda: net(x), (net,)) == 2 * 5 * 8 * 4
    # the same storage saved twice (a view of it too) is counted once
    y = torch.randn(6, 2, requires_grad=True)
    assert mp.saved_bytes(lambda: (y * y).sum() + (y.view(12) * y.view(12)).sum()) == 6 * 2 * 4


def test_nested_checkpoint_recorder_hand_count():
    """x (N floats, grad) -sin-> a -[block A: exp -> b, [block B: sigmoid], cos]-> out, float32, N = 1000.

    The outer graph keeps sin's input x and A's input a (for A's recomputation): 2N. A's backward holds what A saves
    (exp's output b, cos's input c; B's input is b again): 2N, plus B's backward (sigmoid's output): N. Peak = 2N +
    (2N + N) = 5N floats. A second, memoized B of the same shape on meta adds its input only."""
    N = 1000
    for device in ("cpu", "meta"):
        rec = mp.NestedCheckpointRecorder()
        x = torch.zeros(N, device=device, requires_grad=True)

        def block_a(a):
            b = a.exp()
            return rec(lambda t: t.sigmoid() * 2, b).cos()

        assert rec.measure(lambda: rec(block_a, x.sin())) == 5 * N * 4
    rec = mp.NestedCheckpointRecorder()
    x = torch.zeros(N, device="meta", requires_grad=True)
    twice = rec.measure(lambda: rec(lambda t: t.sigmoid() * 2, x.sin()) + rec(lambda t: t.sigmoid() * 2, x.cos()))
    assert twice == (3 + 1) * N * 4  # x, the two block inputs, one block backward (sigmoid's output)


def test_attention_counted_as_fused_kernels_store_it():
    B, H, L, S, D = 2, 3, 7, 5, 4
    q = torch.randn(B, H, L, D, requires_grad=True)
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    got = mp.saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert got == 4 * (2 * B * H * L * D + 2 * B * H * S * D) + 4 * B * H * L  # q, out, k, v + fp32 log-sum-exp
    assert torch.nn.functional.scaled_dot_product_attention is not mp.fused_attention_accounting  # restored


def test_tiny_plan_hand_counts(tmp_path):
    """The whole plan on a tiny UNet3D under ZeRO-2 over 4 GPUs: LoRA counted by hand from the targeted Linears."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e9, "allgather_bucket_size": 1e9},
                              "bf16": {"enabled": True}}))
    cfg = load_config(None, {"mode": "dpo", "deepspeed": str(ds), "model": {"tiny": "unet3d", "num_frames": 4},
                             "lora": {"rank": 2, "target_modules": ["to_q", "to_v"]}, "reward": {"kind": "none"}})
    plan = mp.plan_memory(cfg, num_gpus=4)
    from pisces_fast.training.generators import tiny_denoiser

    base = tiny_denoiser("unet3d", 3)
    lora = sum(2 * (m.in_features + m.out_features) for n, m in base.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in ("to_q", "to_v"))
    frozen = sum(p.numel() for p in base.parameters())
    assert plan.params["LoRA r=2 on to_q,to_v (trainable)"] == lora
    assert plan.params["denoiser UNet3DConditionModel (base, frozen)"] == frozen
    rows = list(plan.rows.values())
    assert rows[0] == 2 * (frozen + lora) and rows[1] == 2 * lora / 4 and rows[2] == 12 * lora / 4
    assert plan.rows["DeepSpeed buffers (buckets / live params)"] == 2 * 2 * lora
    assert plan.num_gpus == 4 and plan.zero_stage == 2 and plan.activations_without_ckpt > 0
    assert plan.total == sum(plan.rows.values()) and plan.fits


# ----------------------------------------------------------------------------------------------------------
# --dry_run on every shipped recipe at its own sizes (meta device: no weights): each fits 80 GB on 8 GPUs


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_dry_run_every_recipe(path):
    cfg = load_config(path, {"dry_run": True})
    plan = mp.plan_memory(cfg, measure_both=False)
    text = plan.format()
    assert plan.num_gpus == 8 and plan.zero_stage == (3 if "hunyuan" in path else 2)
    assert "fits in 80 GiB" in text and "meta device" in text
    assert plan.fits, text  # a shipped recipe runs on the paper's 8x A100 80GB
    den = next(k for k in plan.params if k.startswith("denoiser"))
    expected = {"modelscope": (1.2e9, 1.6e9), "wan2.1": (1.3e9, 1.5e9), "hunyuan": (12.5e9, 13.2e9)}
    lo, hi = next(v for k, v in expected.items() if k in os.path.basename(path))
    assert lo < plan.params[den] < hi  # ModelScope UNet ~1.4B, Wan 1.3B, HunyuanVideo 13B
    assert all(v >= 0 for v in plan.rows.values()) and any("activations" in k for k in plan.rows)
    if cfg.reward.kind == "pisces":
        iv2 = next(v for k, v in plan.params.items() if k.startswith("reward InternVideo2"))
        assert 1.3e9 < iv2 < 1.45e9  # ViT-1B (40 x 1408) + BERT-large with 5 fusion layers + heads
    if cfg.mode == "cd" and "modelscope" not in path:  # the reward's decode through a temporal video VAE
        row = next(k for k in plan.rows if k.startswith("VAE decode for the reward"))
        assert "sparse, checkpointed" in row and plan.rows[row] < 30 * mp.GiB


def test_reward_decode_fields_are_checked():
    path = recipe("wan2.1_1.3b", "pisces_cd")
    with pytest.raises(ValueError, match="config `reward.vae_decode`: expected 'full' or 'sparse'"):
        load_config(path, {"dry_run": True, "reward": {"vae_decode": "prefix"}})
    with pytest.raises(ValueError, match="config `reward.vae_checkpointing`: expected bool"):
        load_config(path, {"dry_run": True, "reward": {"vae_checkpointing": "yes"}})


def test_train_py_dry_run_flag(capsys):
    sys.path.insert(0, ROOT)
    import train

    out = train.main(["--config", recipe("wan2.1_1.3b", "dpo"), "--dry_run", "--dry_run_gpus", "4"])
    printed = capsys.readouterr().out
    assert out["memory_plan"].num_gpus == 4 and "memory per GPU (ZeRO-2, 4 GPUs)" in printed
    assert "WanTransformer3DModel" in printed and "UMT5EncoderModel" in printed


# ----------------------------------------------------------------------------------------------------------
# Done when: tiny random models in every real layout train through train.py from the shipped recipes

WORDS = "a the red blue green cat dog square circle moving left right up down".split()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return save_all_tiny_layouts(str(tmp_path_factory.mktemp("layouts")))


@pytest.fixture(scope="module")
def reward_assets(tmp_path_factory):
    """A tiny InternVideo2 in the official stage-2 layout converted by the project's command, its tokenizer and an
    OT map of its embedding size: what `reward.kind: pisces` reads."""
    from pisces_fast.rewards import InternVideo2, InternVideo2Config, OTMap, OTMapConfig, build_word_tokenizer
    from pisces_fast.rewards import convert_internvideo2 as convert_cli

    d = tmp_path_factory.mktemp("reward")
    tok = build_word_tokenizer(WORDS)
    tok.save_pretrained(str(d / "tok"))
    torch.manual_seed(0)
    config = InternVideo2Config.tiny(vocab_size=len(tok))
    (d / "iv2.json").write_text(json.dumps(config.to_dict()))
    state = {("text_encoder.bert." + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): v
             for k, v in InternVideo2(config).state_dict().items()}
    torch.save({"module": state}, d / "stage2.pt")  # the official checkpoint is a pickled DeepSpeed dict
    assert convert_cli.main([str(d / "stage2.pt"), str(d / "iv2.safetensors"), "--trust-pickle",
                             "--config", str(d / "iv2.json")]) == 0
    OTMap(OTMapConfig(dim=config.embed_dim, hidden=8)).save(d / "ot_map")
    return d


def tiny_overrides(family: str, layout: str, out: str, reward_dir) -> list:
    sizes = TINY_SIZES[FAMILIES[family]]
    args = ["--output_dir", out, "--deepspeed", "null", "--max_steps", "1", "--checkpoint_every", "0",
            "--optim.grad_accum", "1", "--validation.every", "0",
            "--model.path", layout, "--model.dtype", "float32", "--lora.rank", "2", "--lora.alpha", "2",
            "--data.kind", "synthetic", "--data.path", "null", "--data.synthetic_size", "2",
            "--grpo.num_sampling_steps", "2", "--cd.num_ddim_timesteps", "10",
            "--optim.lr", "1e-3"]  # (one step at the recipes' 1e-6 would leave the LoRA indistinguishable from zero)
    for key, value in sizes.items():
        args += [f"--model.{key}", str(value)]
    if reward_dir is not None:
        args += ["--reward.backbone.checkpoint", str(reward_dir / "iv2.safetensors"),
                 "--reward.backbone.tokenizer", str(reward_dir / "tok"), "--reward.backbone.config",
                 str(reward_dir / "iv2.json"), "--reward.backbone.num_frames", "4", "--reward.num_frames", "4",
                 "--reward.ot_map", str(reward_dir / "ot_map"), "--reward.pot.max_iter", "10"]
    return args


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recipe_trains_tiny_layout(family, mode, layouts, reward_assets, tmp_path):
    sys.path.insert(0, ROOT)
    import train

    path = recipe(family, mode)
    cfg = load_config(path, {"dry_run": True})
    out = str(tmp_path / "run")
    argv = ["--config", path, *tiny_overrides(family, layouts[FAMILIES[family]], out,
                                              reward_assets if cfg.reward.kind == "pisces" else None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.main(argv)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    assert [r["step"] for r in lines] == [1] and torch.isfinite(torch.tensor(lines[0]["loss"]))
    if mode != "dpo":
        assert {"reward_quality", "reward_semantic"} & set(lines[0]) or any(k.startswith("reward") for k in lines[0])
    lora = result["lora_diffusers"]
    assert os.path.isfile(lora)
    run_cfg = json.load(open(os.path.join(out, "config.json")))
    assert run_cfg["model"]["path"] == layouts[FAMILIES[family]] and run_cfg["lora"]["rank"] == 2
    if mode == "pisces_cd":
        stock_pipeline_reproduces_the_student(family, argv, out, os.path.dirname(lora))


PIPELINES = {"modelscope": "TextToVideoSDPipeline", "wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline"}


@torch.no_grad()
def stock_pipeline_reproduces_the_student(family, argv, out, lora_dir):
    """The exported LoRA, loaded into the stock diffusers pipeline with pisces_fast.load_lora, gives the trained
    student's denoiser output (the project's denoiser with the checkpointed LoRA) on the same inputs."""
    import diffusers

    import pisces_fast
    from pisces_fast.training.config import config_from_argv
    from pisces_fast.training.generators import generator_from_config
    from pisces_fast.training.lora import adapter_disabled, add_lora, load_lora_state_dict, read_lora

    cfg = config_from_argv(argv)
    gen = generator_from_config(cfg.model)
    if cfg.cd.guidance_conditioning:
        gen.enable_guidance_conditioning(cfg.cd.guidance_embedding_dim)
    add_lora(gen.denoiser, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    last = sorted(glob.glob(os.path.join(out, "checkpoints", "checkpoint-*", "lora.safetensors")))[-1]
    load_lora_state_dict(gen.denoiser, read_lora(last)[0])
    gen.denoiser.eval()
    pipe = getattr(diffusers, PIPELINES[FAMILIES[family]]).from_pretrained(cfg.model.path)
    s = cfg.cd.guidance_scale_min
    folded = gen.arch == "unet3d" and cfg.cd.guidance_conditioning
    pisces_fast.load_lora(pipe, lora_dir, **({"guidance_scale": s} if folded else {}))
    stock = pipe.unet if gen.arch == "unet3d" else pipe.transformer
    stock.eval()
    torch.manual_seed(0)
    x = torch.randn(gen.latent_shape(1))
    t = torch.tensor([500]) if gen.prediction == "epsilon" else torch.tensor([0.6])
    text = gen.encode_text(["a red cat moving left"])
    student = gen.denoise(gen.denoiser, x, t, text, guidance=s)
    with adapter_disabled(gen.denoiser):
        base = gen.denoise(gen.denoiser, x, t, text, guidance=s)
    loaded = gen.denoise(stock, x, t, text, guidance=None if folded else s)  # the w is in the weights when folded
    assert (student - base).abs().max() > 1e-4  # the trained LoRA changes the output
    torch.testing.assert_close(loaded, student, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# VideoCrafter2's UNet -> UNet3DConditionModel (pisces_fast/training/videocrafter2.py)

TINY_VC2 = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
            "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "block_out_channels": [32, 64], "layers_per_block": 2,
            "norm_num_groups": 4, "cross_attention_dim": 16, "attention_head_dim": 8}


def lvdm_timestep_embedding(t: float, dim: int) -> torch.Tensor:
    """lvdm.models.utils_diffusion.timestep_embedding (repeat_only=False), written out: [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(half, dtype=torch.float64) / half)
    args = t * freqs
    return torch.cat([torch.cos(args), torch.sin(args)])


def test_videocrafter2_table_covers_the_real_unet():
    from diffusers import UNet3DConditionModel

    from pisces_fast.training.videocrafter2 import VC2_UNET_CONFIG, key_table

    with torch.device("meta"):
        unet = UNet3DConditionModel(**VC2_UNET_CONFIG)
    table = list(key_table(VC2_UNET_CONFIG))
    modules = {d for _, d, _ in table}
    assert all(any(k.startswith(m + ".") for m in modules) for k in unet.state_dict())
    assert len({s for s, _, _ in table}) == len(table)  # one VideoCrafter2 module per diffusers module
    # heads: channels / 64 at every level (VideoCrafter2's num_head_channels 64), 8 x 64 in the first temporal attention
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks[:3]] == [5, 10, 20]
    assert unet.transformer_in.transformer_blocks[0].attn1.heads == 8 and unet.transformer_in.proj_in.out_features == 512
    assert sum(p.numel() for p in unet.parameters()) > 1.3e9


def test_videocrafter2_conversion_round_trip_and_fps_fold(tmp_path):
    from diffusers import UNet3DConditionModel
    from safetensors.torch import save_file

    from pisces_fast.training import videocrafter2 as vc2

    torch.manual_seed(0)
    ref = UNet3DConditionModel(**TINY_VC2)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # the same weights under VideoCrafter2's names and layouts (use_linear projections, Conv1d in init_attn)
    inverse = sorted(vc2.key_table(TINY_VC2), key=lambda row: -len(row[1]))
    renames = {new: old for old, new in vc2._RESNET_RENAMES}
    state = {}
    for key, value in ref.state_dict().items():
        src, dst, kind = next(row for row in inverse if key.startswith(row[1] + "."))
        rest = key[len(dst) + 1:]
        if kind == "resnet" and not rest.startswith("temp"):
            rest = next((renames[n] + rest[len(n):] for n in renames if rest.startswith(n)), rest)
        if value.dim() == 4 and ("proj_in" in rest or "proj_out" in rest):
            value = value[:, :, 0, 0]  # diffusers' 1x1 conv -> VideoCrafter2's Linear
        if dst == "transformer_in" and rest.startswith(("proj_in.weight", "proj_out.weight")):
            value = value[:, :, None]  # Linear -> VideoCrafter2's Conv1d (init_attn has no use_linear)
        state[vc2.UNET_PREFIX + src + "." + rest] = value.clone()
    C = TINY_VC2["block_out_channels"][0]
    fps_w = {"fps_embedding.0.weight": torch.randn(4 * C, C), "fps_embedding.0.bias": torch.randn(4 * C),
             "fps_embedding.2.weight": torch.randn(4 * C, 4 * C), "fps_embedding.2.bias": torch.randn(4 * C)}
    state.update({vc2.UNET_PREFIX + k: v for k, v in fps_w.items()})
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the rest of the checkpoint is ignored
    save_file(state, str(tmp_path / "vc2.safetensors"))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_VC2))
    assert vc2.main([str(tmp_path / "vc2.safetensors"), str(tmp_path / "out"), "--fps", "16",
                     "--config", str(tmp_path / "tiny.json")]) == 0
    got = UNet3DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet")
    # fps folded exactly: linear_2.bias += fps_embedding(timestep_embedding(16)), computed independently
    e = lvdm_timestep_embedding(16.0, C)
    h = torch.nn.functional.silu(e @ fps_w["fps_embedding.0.weight"].double().T + fps_w["fps_embedding.0.bias"].double())
    fps_emb = h @ fps_w["fps_embedding.2.weight"].double().T + fps_w["fps_embedding.2.bias"].double()
    for k, v in got.state_dict().items():
        want = ref.state_dict()[k]
        if k == "time_embedding.linear_2.bias":  # (diffusers' sinusoid is float32: rounding of cos/sin at t = 16)
            torch.testing.assert_close(v.double(), want.double() + fps_emb, rtol=1e-6, atol=1e-5)
            assert (v - want).abs().max() > 1  # the fold did happen
            continue
        assert torch.equal(v, want), k
    with pytest.raises(ValueError, match="--fps"):
        vc2.convert_videocrafter2_unet(state, None, TINY_VC2)
    with pytest.raises(ValueError, match="init_attn"):
        vc2.convert_videocrafter2_unet({k: v for k, v in state.items() if "init_attn" not in k}, 16, TINY_VC2)
    with pytest.raises(ValueError, match="no UNet3DConditionModel counterpart"):
        bad = {**state, vc2.UNET_PREFIX + "input_blocks.1.2.relative_position_k.x": torch.zeros(1)}
        vc2.build_unet(vc2.convert_videocrafter2_unet(bad, 16, TINY_VC2), TINY_VC2)
