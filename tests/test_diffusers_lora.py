"""Our UNet LoRA/AdaLoRA, written as diffusers' LoRA file, loads with a pipeline's ``load_lora_weights`` and gives
the same denoiser outputs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import forward, tiny_unet

from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers, inject_adapters
from lightning_peft.adapters.diffusers_lora import DIFFUSERS_LORA_WEIGHTS, save_diffusers_lora

pytest.importorskip("peft")  # diffusers builds its LoRA layers with peft


def _tiny_pipeline():
    """A StableDiffusionPipeline around a fresh tiny UNet, from configs (offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    )
    text = CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=None,
        unet=tiny_unet(seed=0),
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_pipeline_loads_our_unet_lora(method: str, tmp_path) -> None:
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if method == "lora":
        config: LoRAConfig = LoRAConfig(r=4, alpha=8, target_modules=targets, init="nonzero")
    else:
        config = AdaLoRAConfig(r=4, target_r=2, alpha=8, total_step=10, target_modules=targets, init="nonzero")
    torch.manual_seed(1)
    ours = tiny_unet(seed=0)
    inject_adapters(ours, config)
    if method == "adalora":  # pruned triplets (another rank in one layer) and non-zero singular values
        next(layer for _, layer in adapter_layers(ours)).shrink(torch.tensor([True, False, True, False]))
        with torch.no_grad():
            for _, layer in adapter_layers(ours):
                layer.lora_E.normal_()
    if method == "lora":
        save_diffusers_lora(ours, tmp_path)
    else:  # the same through export
        import lightning_peft

        lightning_peft.export(ours, tmp_path, format="diffusers-lora")
    assert (tmp_path / DIFFUSERS_LORA_WEIGHTS).is_file()
    pipe = _tiny_pipeline()
    with torch.no_grad():
        before = forward("unet", pipe.unet.eval())
        pipe.load_lora_weights(tmp_path)
        got, want = forward("unet", pipe.unet.eval()), forward("unet", ours.eval())
    assert (want - before).abs().max() > 1e-3  # the adapter changes the output, so the check below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
