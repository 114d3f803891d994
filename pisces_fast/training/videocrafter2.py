"""VideoCrafter2's UNet (lvdm `openaimodel3d.UNetModel`) as a diffusers `UNet3DConditionModel`.

    python -m pisces_fast.training.videocrafter2 model.ckpt OUT_DIR --fps 16 [--trust-pickle]

writes OUT_DIR/unet (config.json + diffusion_pytorch_model.safetensors). Block by block (docs/real_models.md):
conv_in, the initial temporal attention (`init_attn` -> `transformer_in`, 8 heads of 64), every ResBlock with its
temporal conv (`temopral_conv` -> `temp_convs`), the spatial transformers (`use_linear` Linear projections ->
diffusers' 1x1 convolutions, same weights reshaped), the temporal transformers (self-attention only), the
down/upsamplers and the output head map one to one; attention heads are channels/64 at every level on both sides.
VideoCrafter2's frame-rate embedding (`fps_cond`) has no slot in UNet3DConditionModel: for a fixed frame rate it is
a constant added to the time embedding, folded exactly into `time_embedding.linear_2.bias` (`--fps`).

Not converted, and why (docs/real_models.md): VideoCrafter2 was trained with a scaled noise schedule
(`use_scale`, `scale_b: 0.7`: x_t = sqrt(abar_t) s_t x0 + sqrt(1 - abar_t) eps, s_t from 1 to 0.7), which no
stock diffusers scheduler implements; the UNet converted here is exact, the schedule it expects is not.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Optional

import torch

# VideoCrafter2 (configs/inference_t2v_512_v2.0.yaml: model_channels 320, channel_mult [1, 2, 4, 4],
# num_res_blocks 2, attention_resolutions [4, 2, 1], num_head_channels 64, context_dim 1024) in diffusers' terms.
VC2_UNET_CONFIG = {
    "sample_size": [40, 64], "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1024, "attention_head_dim": 64,
}
UNET_PREFIX = "model.diffusion_model."
_RESNET_RENAMES = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                   ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def key_table(config: dict) -> Iterator[tuple[str, str, str]]:
    """(VideoCrafter2 module prefix, diffusers module prefix, kind) for every module of the UNet."""
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    yield "time_embed.0", "time_embedding.linear_1", "plain"
    yield "time_embed.2", "time_embedding.linear_2", "plain"
    yield "input_blocks.0.0", "conv_in", "plain"
    yield "init_attn.0", "transformer_in", "plain"
    i = 1
    for level in range(n):
        for j in range(per):
            yield f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "resnet"
            yield f"input_blocks.{i}.0.temopral_conv", f"down_blocks.{level}.temp_convs.{j}", "plain"
            if attn[level]:
                yield f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "plain"
                yield f"input_blocks.{i}.2", f"down_blocks.{level}.temp_attentions.{j}", "plain"
            i += 1
        if level < n - 1:
            yield f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"
            i += 1
    yield "middle_block.0", "mid_block.resnets.0", "resnet"
    yield "middle_block.0.temopral_conv", "mid_block.temp_convs.0", "plain"
    yield "middle_block.1", "mid_block.attentions.0", "plain"
    yield "middle_block.2", "mid_block.temp_attentions.0", "plain"
    yield "middle_block.3", "mid_block.resnets.1", "resnet"
    yield "middle_block.3.temopral_conv", "mid_block.temp_convs.1", "plain"
    i = 0
    for level, has_attn in enumerate(reversed(attn)):
        for j in range(per + 1):
            yield f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", "resnet"
            yield f"output_blocks.{i}.0.temopral_conv", f"up_blocks.{level}.temp_convs.{j}", "plain"
            k = 1
            if has_attn:
                yield f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}", "plain"
                yield f"output_blocks.{i}.2", f"up_blocks.{level}.temp_attentions.{j}", "plain"
                k = 3
            if level < n - 1 and j == per:
                yield f"output_blocks.{i}.{k}.conv", f"up_blocks.{level}.upsamplers.0.conv", "plain"
            i += 1
    yield "out.0", "conv_norm_out", "plain"
    yield "out.2", "conv_out", "plain"


def _target_key(key: str, table: list) -> Optional[str]:
    for src, dst, kind in table:  # longest prefix first
        if key.startswith(src + "."):
            rest = key[len(src) + 1:]
            if kind == "resnet":
                for old, new in _RESNET_RENAMES:
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
            return f"{dst}.{rest}"
    return None


def fps_bias(state: dict, fps: float, channels: int) -> torch.Tensor:
    """VideoCrafter2's fps embedding for a fixed frame rate: fps_embedding(timestep_embedding(fps)) (cos first)."""
    from diffusers.models.embeddings import get_timestep_embedding

    e = get_timestep_embedding(torch.tensor([float(fps)]), channels, flip_sin_to_cos=True, downscale_freq_shift=0)
    w1, b1 = state["fps_embedding.0.weight"].double(), state["fps_embedding.0.bias"].double()
    w2, b2 = state["fps_embedding.2.weight"].double(), state["fps_embedding.2.bias"].double()
    return (torch.nn.functional.silu(e.double() @ w1.T + b1) @ w2.T + b2)[0]


def convert_videocrafter2_unet(state: dict, fps: Optional[float], config: Optional[dict] = None) -> dict:
    """A VideoCrafter2 UNet state dict (keys with or without `model.diffusion_model.`) -> UNet3DConditionModel keys."""
    config = dict(VC2_UNET_CONFIG if config is None else config)
    if any(k.startswith(UNET_PREFIX) for k in state):
        state = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not any(k.startswith("input_blocks.") for k in state):
        raise ValueError("checkpoint: no VideoCrafter2 UNet keys (expected `model.diffusion_model.input_blocks.*`)")
    if not any(k.startswith("init_attn.") for k in state):
        raise ValueError("checkpoint: no `init_attn` (VideoCrafter2's initial temporal attention): not a "
                         "VideoCrafter2 text-to-video UNet (addition_attention: true)")
    table = sorted(key_table(config), key=lambda row: -len(row[0]))
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith("fps_embedding."):
            continue
        target = _target_key(key, table)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    if unknown:
        raise ValueError(f"checkpoint: {len(unknown)} UNet keys with no UNet3DConditionModel counterpart, e.g. "
                         f"{unknown[:3]} (a different VideoCrafter variant? relative position / image attention / "
                         "spatial-aware temporal convs are not supported)")
    has_fps = "fps_embedding.0.weight" in state
    if has_fps and fps is None:
        raise ValueError("--fps: this UNet is frame-rate conditioned (fps_cond); give the frame rate to fold into the "
                         "time embedding (the rate you sample at, e.g. 16)")
    if has_fps:
        b = out["time_embedding.linear_2.bias"]
        out["time_embedding.linear_2.bias"] = (b.double() + fps_bias(state, fps, config["block_out_channels"][0])).to(b.dtype)
    return out


def build_unet(state: dict, config: Optional[dict] = None):
    """UNet3DConditionModel with the converted weights; 1x1-conv / linear projections reshaped to the target's layout."""
    from diffusers import UNet3DConditionModel

    unet = UNet3DConditionModel(**(VC2_UNET_CONFIG if config is None else config))
    target = unet.state_dict()
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(f"checkpoint: {len(missing)} UNet3DConditionModel weights missing after conversion, e.g. "
                         f"{missing[:3]}")
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise ValueError(f"checkpoint: {len(unexpected)} weights with no UNet3DConditionModel counterpart, e.g. "
                         f"{unexpected[:3]} (a different VideoCrafter variant? relative position / image attention "
                         "are not supported)")
    fixed = {}
    for k, v in state.items():
        want = target[k].shape
        if v.shape != want:
            if v.numel() != target[k].numel():
                raise ValueError(f"checkpoint: {k} has shape {tuple(v.shape)}, UNet3DConditionModel expects {tuple(want)}")
            v = v.reshape(want)  # Linear (out, in) <-> 1x1 conv (out, in, 1[, 1])
        fixed[k] = v
    unet.load_state_dict(fixed, strict=True)
    return unet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pisces_fast.training.videocrafter2", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="VideoCrafter2 model.ckpt (Lightning) or a .safetensors of its state dict")
    p.add_argument("out", help="output directory; the UNet goes to OUT/unet")
    p.add_argument("--fps", type=float, default=None, help="frame rate folded into the time embedding (required for fps_cond)")
    p.add_argument("--config", default=None,
                   help="a UNet3DConditionModel config.json of the same layout (default: VideoCrafter2's, VC2_UNET_CONFIG)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling non-tensor objects in a torch checkpoint you trust (Lightning .ckpt files carry them)")
    args = p.parse_args(argv)
    from pisces_fast.rewards.backbones.internvideo2_checkpoint import read_checkpoint

    try:
        config = None
        if args.config is not None:
            import json

            with open(args.config) as fh:
                config = {k: v for k, v in json.load(fh).items() if not k.startswith("_")}
        state = read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        unet = build_unet(convert_videocrafter2_unet(state, args.fps, config), config)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"videocrafter2: {exc}")
    unet.save_pretrained(os.path.join(args.out, "unet"), safe_serialization=True)
    print(f"wrote {os.path.join(args.out, 'unet')} ({sum(p.numel() for p in unet.parameters()):,} parameters); "
          "see docs/real_models.md for the noise schedule it expects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
