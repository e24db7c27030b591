"""Class-conditional denoising diffusion (DDPM) with a diffusers UNet or DiT, for the diffusion examples.

The data is any ``(images, labels)`` loader; the examples use :class:`~lightning_peft.tasks.DigitsDataModule`
(scikit-learn's real 8x8 digits, upscaled to 16x16). Offline the backbone is built from a small config
with random weights; ``pretrained`` loads it from a diffusers pipeline (Hub id or folder) instead.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.tasks.base import TrainableAdamW

__all__ = ["DenoisingModule"]

Arch = Literal["unet", "dit"]


def _unet_config(
    sample_size: int, in_channels: int, width: int, depth: int, cross_attention_dim: int
) -> dict[str, Any]:
    """``UNet2DConditionModel`` config: ``depth`` levels of ``width * 2**i`` channels, all but the last cross-attend."""
    down = ["CrossAttnDownBlock2D"] * (depth - 1) + ["DownBlock2D"] if depth > 1 else ["CrossAttnDownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (depth - 1) if depth > 1 else ["CrossAttnUpBlock2D"]
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": tuple(width * 2**i for i in range(depth)),
        "layers_per_block": 1,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def _dit_config(
    sample_size: int, in_channels: int, width: int, depth: int, num_heads: int, patch_size: int, num_classes: int
) -> dict[str, Any]:
    """A ``DiTTransformer2DModel`` config: ``depth`` blocks of width ``width``, one label embedding per class."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "patch_size": patch_size,
        "num_layers": depth,
        "num_attention_heads": num_heads,
        "attention_head_dim": width // num_heads,
        "num_embeds_ada_norm": num_classes,
    }


class DenoisingModule(TrainableAdamW, pl.LightningModule):
    """A class-conditional diffusion model trained with the DDPM noise-prediction loss.

    Each training step draws a timestep per image, noises the image with
    ``diffusers.DDPMScheduler.add_noise`` and regresses the noise (``epsilon``; ``v`` when a pretrained
    scheduler says ``v_prediction``) with the mean squared error. Validation does the same with noise and
    timesteps drawn from a generator seeded by the batch index, so ``val_loss`` is comparable between epochs
    and runs. The backbone lives at ``self.model``: a ``UNet2DConditionModel`` conditioned through
    cross-attention on a learned embedding of the label (``self.label_embedding``, ``encoder_hidden_states``
    of one token), or a ``DiTTransformer2DModel`` conditioned on ``class_labels`` (its own label embedding,
    with DiT's 10 % label dropout for classifier-free guidance). The label embedding of the UNet is not part
    of the backbone: it trains in full beside the adapters and is saved in Lightning checkpoints, not in the
    adapter folder. Only parameters that require grad at ``configure_optimizers`` time go to AdamW, so a PEFT
    callback's freezing is respected.

    Args:
        arch: ``"unet"`` or ``"dit"``.
        num_classes: number of labels (the digits: 10).
        sample_size: side of the square images (or latents) the model sees; must match the data.
        in_channels: image channels (1 for grey digits); ignored with ``pretrained`` (the model's config wins).
        width: channels of the UNet's first level (doubled at each next level; a multiple of 8), or the DiT's
            hidden size (a multiple of ``num_heads``).
        depth: UNet levels (every level but the last has cross-attention) or DiT transformer blocks.
        num_heads: DiT attention heads.
        patch_size: DiT patch side.
        model_kwargs: extra config entries that override the ones above (``layers_per_block``, ...).
        pretrained: a diffusers pipeline (Hub id or folder, e.g. ``"facebook/DiT-XL-2-256"``) to load the
            backbone from (its ``unet`` or ``transformer`` subfolder) and the noise schedule (``scheduler``);
            None builds the small random model described by the size arguments.
        subfolder: the backbone's subfolder in ``pretrained``; default ``"unet"`` or ``"transformer"``, ``""``
            for a folder that holds the model itself.
        vae: encode images into latents (the mean of the posterior, scaled) with the pipeline's VAE
            (``pretrained`` only; frozen). Latent diffusion models such as Stable Diffusion and DiT need it.
        num_train_timesteps: length of the noise schedule when it is not loaded.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Raises:
        ValueError: an unknown ``arch``, ``vae`` without ``pretrained``, or sizes the architecture cannot take.

    Example:
        >>> module = DenoisingModule("dit", width=16, depth=1, num_heads=2)
        >>> loss = module.denoising_loss(torch.zeros(2, 1, 16, 16), torch.tensor([3, 7]))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        arch: Arch = "unet",
        num_classes: int = 10,
        sample_size: int = 16,
        in_channels: int = 1,
        width: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        patch_size: int = 2,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        subfolder: str | None = None,
        vae: bool = False,
        num_train_timesteps: int = 1000,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if arch not in ("unet", "dit"):
            raise ValueError(f"arch must be 'unet' or 'dit', got {arch!r}")
        if vae and pretrained is None:
            raise ValueError("vae=True needs pretrained: the VAE is loaded from the pipeline's 'vae' subfolder")
        if pretrained is None and arch == "unet" and (width % 8 or depth < 1):
            raise ValueError(
                f"the UNet needs width a multiple of 8 (GroupNorm of 8 groups) and depth >= 1, got {width=}, {depth=}"
            )
        if pretrained is None and arch == "dit" and (width % num_heads or depth < 1):
            raise ValueError(
                f"the DiT needs width a multiple of num_heads and depth >= 1, got {width=}, {num_heads=}, {depth=}"
            )
        self.save_hyperparameters()
        from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel

        self.arch, self.lr, self.weight_decay = arch, lr, weight_decay
        model_cls = UNet2DConditionModel if arch == "unet" else DiTTransformer2DModel
        if pretrained is not None:
            folder = subfolder if subfolder is not None else ("unet" if arch == "unet" else "transformer")
            self.model = model_cls.from_pretrained(pretrained, subfolder=folder or None, **(model_kwargs or {}))
            self.model.train()  # from_pretrained returns eval mode
            self.scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
        else:
            if arch == "unet":
                config = _unet_config(sample_size, in_channels, width, depth, cross_attention_dim=width)
            else:
                config = _dit_config(sample_size, in_channels, width, depth, num_heads, patch_size, num_classes)
            self.model = model_cls(**{**config, **(model_kwargs or {})})
            self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
        self.vae: nn.Module | None = None
        if vae:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae").requires_grad_(False).eval()
        self.label_embedding: nn.Embedding | None = None
        if arch == "unet":
            self.label_embedding = nn.Embedding(num_classes, self.model.config.cross_attention_dim)

    @property
    def num_train_timesteps(self) -> int:
        """Length of the noise schedule."""
        return int(self.scheduler.config.num_train_timesteps)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to what the backbone denoises: the images, or the VAE's scaled latents."""
        if self.vae is None:
            return images
        vae: Any = self.vae  # an AutoencoderKL
        with torch.no_grad():
            latents = vae.encode(images.to(vae.dtype)).latent_dist.mean
        return latents * vae.config.scaling_factor

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The backbone's noise (or ``v``) prediction for ``sample`` at ``timesteps``, conditioned on ``labels``."""
        if self.label_embedding is not None:
            context = self.label_embedding(labels)[:, None, :]
            return self.model(sample, timesteps, encoder_hidden_states=context).sample
        out = self.model(sample, timesteps, class_labels=labels).sample
        return out[:, : sample.shape[1]]  # DiT checkpoints that learn the variance predict 2x the channels

    def denoising_loss(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The DDPM loss of one batch: MSE between the predicted and the true noise (or ``v``).

        Args:
            images: ``(B, C, H, W)`` in [-1, 1].
            labels: ``(B,)`` class indices.
            generator: a CPU generator for the noise and the timesteps; None uses the global RNG.
        """
        x0 = self.encode(images)
        if generator is None:
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        else:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        return F.mse_loss(self(noisy, t, labels).float(), target.float())

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, num_inference_steps: int = 50, seed: int = 0) -> torch.Tensor:
        """Sample images of the given classes with DDPM ancestral sampling (``vae``-encoded models return latents).

        Args:
            labels: ``(B,)`` class indices.
            num_inference_steps: denoising steps.
            seed: seed of the starting noise and of every step's noise.

        Returns:
            ``(B, C, H, W)`` samples, images roughly in [-1, 1].
        """
        from diffusers import DDPMScheduler

        sampler = DDPMScheduler.from_config(self.scheduler.config, variance_type="fixed_small")
        sampler.set_timesteps(num_inference_steps)
        gen = torch.Generator().manual_seed(seed)
        config = self.model.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = torch.randn(shape, generator=gen).to(self.device)
        labels = labels.to(self.device)
        for t in sampler.timesteps:
            pred = self(x, t.expand(len(labels)).to(self.device), labels)
            x = sampler.step(pred, t, x, generator=gen).prev_sample
        return x

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.denoising_loss(images, labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        loss = self.denoising_loss(images, labels, generator=torch.Generator().manual_seed(batch_idx))
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        loss = self.denoising_loss(images, labels, generator=torch.Generator().manual_seed(batch_idx))
        self.log("test_loss", loss, sync_dist=True)
