"""Decoding only the frames the reward needs (reward.vae_decode / reward.vae_checkpointing) on the tiny random
AutoencoderKLWan and AutoencoderKLHunyuanVideo of tests/tiny_layouts.py, against diffusers' own full `vae.decode`:

- the claim the sparse Wan decode rests on: AutoencoderKLWan is causal in time (a latent prefix decodes to exactly
  the full decode's first frames), while a window not starting at 0 does not (its causal cache is missing), and
  AutoencoderKLHunyuanVideo is not causal (its GroupNorms see the whole temporal tile);
- the picked frames equal the full decode's frames exactly, for every frame and for strided subsets;
- gradients: Hunyuan's tile-selective decode and Wan's non-sparse chunk loop give the full decode's gradient;
  Wan's sparse decode gives it exactly on the reward frames' own latent frames and zero on the earlier ones (the
  documented truncation at the causal cache); checkpointing changes no gradient.
"""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_layouts import save_tiny_hunyuan, save_tiny_wan  # noqa: E402

from pisces_fast.training.generators import VideoVAECodec, activation_checkpoint, strided_frame_indices  # noqa: E402


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("vaes")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, save, cls in (("wan", save_tiny_wan, diffusers.AutoencoderKLWan),
                                ("hunyuan", save_tiny_hunyuan, diffusers.AutoencoderKLHunyuanVideo)):
            torch.manual_seed(0)
            vae = cls.from_pretrained(save(str(root / name)), subfolder="vae").eval()
            vae.requires_grad_(False)
            out[name] = VideoVAECodec(vae)
    return out


def latents_for(codec, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, codec.latent_channels, frames, 4, 4, generator=g)


def test_wan_vae_is_causal_in_time_and_hunyuan_is_not(vaes):
    with torch.no_grad():
        wan = vaes["wan"].vae
        z = latents_for(vaes["wan"], 6)
        full = wan.decode(z).sample
        for k in (1, 2, 3, 5):
            prefix = wan.decode(z[:, :, :k]).sample
            assert torch.equal(prefix, full[:, :, :prefix.shape[2]])  # exact, not just close
        window = wan.decode(z[:, :, 2:5]).sample  # latent 2 alone decodes as a first chunk: not pixel frame 5
        assert (window[:, :, 0] - full[:, :, 5]).abs().max() > 1e-2

        hy = vaes["hunyuan"].vae
        z = latents_for(vaes["hunyuan"], 6)
        full = hy.decode(z).sample
        prefix = hy.decode(z[:, :, :2]).sample
        assert (prefix - full[:, :, :prefix.shape[2]]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@pytest.mark.parametrize("latent_frames", [2, 8])  # Hunyuan: one tile (no framewise decode) / three blended tiles
def test_selected_frames_equal_the_full_decode(vaes, name, latent_frames):
    codec = vaes[name]
    z = latents_for(codec, latent_frames)
    with torch.no_grad():
        full = codec.decode(z)
        T = full.shape[1]
        assert T == codec.pixel_frames(latent_frames)
        for frames in (list(range(T)), strided_frame_indices(T, 4), [T - 1], [0], [13, 14, 15, 16, 17] if T > 17 else [1]):
            for sparse in (True, False):
                assert torch.equal(codec.decode_frames(z, frames, sparse=sparse), full[:, frames]), (frames, sparse)


def _grad(codec, z, fn):
    z = z.clone().requires_grad_(True)
    w = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 1, 3, 32, 32)
    (fn(z) * w).sum().backward()
    return z.grad


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_gradients_of_the_selected_frames(vaes, name):
    codec = vaes[name]
    z = latents_for(codec, 12, seed=1)
    frames = [5, 14, 22]  # Wan latent chunks 2, 4, 6; Hunyuan tiles 0 and 1 of 4 (14: a blend-zone frame)
    reference = _grad(codec, z, lambda x: codec.decode(x)[:, frames])
    exact = _grad(codec, z, lambda x: codec.decode_frames(x, frames, sparse=False))
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-6)
    calls = []
    hook = codec.vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        sparse = _grad(codec, z, lambda x: codec.decode_frames(x, frames, sparse=True))
    finally:
        hook.remove()
    if name == "hunyuan":  # independent tiles: only 2 of the 4 are decoded, and nothing is truncated
        assert len(calls) == 2
        torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-6)
    else:  # the reward frames' own latent frames get the gradient of the pass through them; earlier ones none
        assert len(calls) == 7  # chunks 0..6: the ones after the last reward frame are skipped (causal)
        own = [2, 4, 6]
        assert sparse[:, :, own].abs().sum() > 0 and (sparse[:, :, own] - reference[:, :, own]).abs().max() < \
            (reference[:, :, own]).abs().max()
        assert sparse[:, :, [0, 1, 3, 5]].abs().sum() == 0 and reference[:, :, [0, 1, 3, 5]].abs().sum() > 0
        assert reference[:, :, 7:].abs().sum() == 0 and sparse[:, :, 7:].abs().sum() == 0
    codec.set_checkpointing(activation_checkpoint)
    try:
        for sparse_mode, ref in ((False, exact), (True, sparse)):
            got = _grad(codec, z, lambda x: codec.decode_frames(x, frames, sparse=sparse_mode))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        full_ckpt = _grad(codec, z, lambda x: codec.decode(x)[:, frames])
        torch.testing.assert_close(full_ckpt, reference, rtol=1e-5, atol=1e-6)
    finally:
        codec.set_checkpointing(None)


def test_hunyuan_spatial_tiles_equal_diffusers_tiled_decode(vaes):
    """reward.vae_tiling: the spatially tiled decode (diffusers' enable_tiling, here 2 x 2 tiles of 3 x 3 latents so
    the tiny VAE tiles at all) of the picked frames equals diffusers' own tiled decode, and so does its gradient,
    with each spatial tile checkpointed too."""
    codec = vaes["hunyuan"]
    vae = codec.vae
    vae.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)
    try:
        z = latents_for(codec, 5, seed=2)  # two temporal tiles
        frames = [0, 14, 16]  # 14: in the blend of the two
        with torch.no_grad():
            full = codec.decode(z)
            assert not torch.equal(full, _untiled(codec, z))  # the tiles are real: blending changes the frames
            assert torch.equal(codec.decode_frames(z, frames), full[:, frames])
        reference = _grad(codec, z, lambda x: codec.decode(x)[:, frames])
        codec.set_checkpointing(activation_checkpoint)
        try:
            got = _grad(codec, z, lambda x: codec.decode_frames(x, frames))
        finally:
            codec.set_checkpointing(None)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    finally:
        vae.disable_tiling()


def _untiled(codec, z):
    codec.vae.use_tiling = False
    try:
        return codec.decode(z)
    finally:
        codec.vae.use_tiling = True


def test_bad_frames_and_unsupported_vae_are_named(vaes):
    codec = vaes["wan"]
    z = latents_for(codec, 2)
    with pytest.raises(ValueError, match=r"frames: expected indices in \[0, 5\)"):
        codec.decode_frames(z, [5])
    from diffusers import AutoencoderKLLTXVideo

    other = VideoVAECodec.__new__(VideoVAECodec)
    torch.nn.Module.__init__(other)
    other.vae = AutoencoderKLLTXVideo.__new__(AutoencoderKLLTXVideo)
    other.vae.__dict__["_internal_dict"] = {"temporal_compression_ratio": 8}
    with pytest.raises(ValueError, match="reward.vae_decode 'sparse'.*AutoencoderKLLTXVideo"):
        other.decode_frames(torch.zeros(1, 4, 2, 4, 4), [0])
