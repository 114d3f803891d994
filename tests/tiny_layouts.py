"""Tiny random text-to-video models saved in the real diffusers directory layouts (tests, CI, recipe checks).

Each `save_tiny_*` writes what the stock pipeline's `save_pretrained` writes (model_index.json, scheduler/,
text_encoder(s)/ + tokenizer(s)/, vae/, unet/ or transformer/), with the component classes the real checkpoints
use, so both `diffusers.<Pipeline>.from_pretrained(dir)` and `pisces_fast.training.generators.load_generator(dir)`
read it. Tokenizers are built offline from tiny vocabularies (no downloads, no sentencepiece):
- CLIP: byte-level BPE with the 256 byte symbols (+ their end-of-word forms) and no merges;
- UMT5 (Wan): a Unigram vocabulary of "▁"-prefixed words and single characters, `T5TokenizerFast`;
- Llama (HunyuanVideo): character BPE with word merges and the template's header tokens, `LlamaTokenizerFast`.

Clip sizes the layouts are built for (pass them to `load_generator` / the YAML `model:` section):
`TINY_SIZES[family] = {"num_frames", "height", "width"}`.
"""
from __future__ import annotations

import string

import torch

TINY_SIZES = {
    "modelscope": {"num_frames": 4, "height": 16, "width": 16},  # AutoencoderKL x2 -> 8x8 latents
    "wan": {"num_frames": 5, "height": 32, "width": 32},  # AutoencoderKLWan x8 spatial, x4 temporal -> 2x4x4
    "hunyuan": {"num_frames": 5, "height": 32, "width": 32},  # AutoencoderKLHunyuanVideo x8 / x4 -> 2x4x4
}

_WORDS = ("a the red blue green cat dog runs jumps moving left right square circle video of in on and with "
          "describe scene camera color").split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (the alphabet of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer():
    """A CLIPTokenizer over the 256 byte symbols and their end-of-word forms (514 tokens, no merges)."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_umt5_tokenizer():
    """A T5TokenizerFast (Unigram) over a few words and every printable character; pad=0, eos=1, unk=2."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in _WORDS]
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_llama_tokenizer():
    """A LlamaTokenizerFast (BPE over characters, with merges spelling out "▁"-prefixed words of the prompt vocabulary
    and of HunyuanVideo's prompt template, and the template's header tokens as special tokens, as in Llama 3), so the
    template is ~110 tokens and the pipeline's crop of 95 leaves the prompt in place; pad = eos."""
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaTokenizerFast

    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    for token in specials:
        template = template.replace(token, " ")
    words = list(dict.fromkeys(list(_WORDS) + re.findall(r"[A-Za-z]+", template)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["▁", "\n"] + list(string.ascii_letters + string.digits + string.punctuation):
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in words:
        piece = "▁"
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    tok = LlamaTokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.pad_token = tok.eos_token
    return tok


def _tiny_clip_text_model(vocab_size: int, hidden: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=hidden, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                        pad_token_id=vocab_size - 1)).eval()


def save_tiny_modelscope(directory: str, seed: int = 0) -> str:
    """TextToVideoSDPipeline layout: UNet3DConditionModel, DDIMScheduler, AutoencoderKL, CLIPTextModel/CLIPTokenizer."""
    from diffusers import AutoencoderKL, TextToVideoSDPipeline

    from pisces_fast.training.generators import tiny_denoiser, tiny_scheduler

    tokenizer = tiny_clip_tokenizer()
    text_encoder = _tiny_clip_text_model(len(tokenizer), seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
    unet = tiny_denoiser("unet3d", 4, text_dim=16)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=tiny_scheduler("unet3d"))
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_wan(directory: str, seed: int = 0) -> str:
    """WanPipeline layout: WanTransformer3DModel, FlowMatchEulerDiscreteScheduler, AutoencoderKLWan,
    UMT5EncoderModel/T5TokenizerFast."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from pisces_fast.training.generators import tiny_denoiser

    tokenizer = tiny_umt5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = tiny_denoiser("wan", 4, text_dim=16)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_hunyuan(directory: str, seed: int = 0) -> str:
    """HunyuanVideoPipeline layout: HunyuanVideoTransformer3DModel (guidance-embedded), FlowMatchEulerDiscreteScheduler,
    AutoencoderKLHunyuanVideo, LlamaModel/LlamaTokenizerFast (text_encoder), CLIPTextModel/CLIPTokenizer (text_encoder_2)."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    from pisces_fast.training.generators import tiny_denoiser

    tokenizer = tiny_llama_tokenizer()
    torch.manual_seed(seed)
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder_2 = _tiny_clip_text_model(len(tokenizer_2), hidden=8, seed=seed + 1)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False)
    transformer = tiny_denoiser("hunyuan", 4, text_dim=16, pooled_dim=8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


SAVERS = {"modelscope": save_tiny_modelscope, "wan": save_tiny_wan, "hunyuan": save_tiny_hunyuan}


def save_all_tiny_layouts(root: str) -> dict[str, str]:
    """Every family's tiny model saved under root/<family>; {family: directory}. Library warnings about the tiny
    sizes are silenced."""
    import os
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {family: save(os.path.join(root, family)) for family, save in SAVERS.items()}
