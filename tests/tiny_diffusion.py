"""Tiny random-weight diffusers pipelines for offline tests.

The builders assemble real diffusers / transformers classes from small configs (a few thousand
parameters each) and ``save_pretrained`` them, so that tests load them back through the same
``from_pretrained`` code path as the real ``lambdalabs/sd-image-variations-diffusers`` weights.
Default output resolution is ``UNET_SAMPLE_SIZE * 2`` = 32 px (the tiny VAE downsamples by 2).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

EMBED_DIM = 16  # CLIP projection dim = UNet cross-attention dim
UNET_SAMPLE_SIZE = 16  # latent side; the tiny VAE has two blocks, so images are 32 px


def _unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * UNET_SAMPLE_SIZE,
    )


def _scheduler():
    from diffusers import PNDMScheduler

    # The scheduler type of lambdalabs/sd-image-variations-diffusers.
    return PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         skip_prk_steps=True, steps_offset=1)


def build_image_variation_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionImageVariationPipeline`` (random weights) to ``folder``."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, projection_dim=EMBED_DIM, num_hidden_layers=1,
        num_attention_heads=2, image_size=224, patch_size=56))
    pipe = StableDiffusionImageVariationPipeline(
        vae=_vae(), image_encoder=encoder, unet=_unet(EMBED_DIM), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def _tokenizer():
    """A CLIP tokenizer with a two-token vocabulary: enough to encode the empty prompt."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def build_img2img_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionImg2ImgPipeline`` (random weights) to ``folder``."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=2, hidden_size=EMBED_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    pipe = StableDiffusionImg2ImgPipeline(
        vae=_vae(), text_encoder=text, tokenizer=_tokenizer(),
        unet=_unet(EMBED_DIM), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)
