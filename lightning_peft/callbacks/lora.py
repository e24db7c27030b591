"""The ``LoRA`` callback: static low-rank adapters, the baseline every other method is compared with."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters import (
    LoRAConfig,
    adapter_layers,
    adapter_state_dict,
    count_parameters,
    inject_adapters,
    peft_config,
    remove_adapters,
    write_adapter,
)
from lightning_peft.adapters.lora import InitKind
from lightning_peft.backbones import Preset
from lightning_peft.callbacks.backbone import resolve_backbone
from lightning_peft.callbacks.base import MethodCallback, restorer
from lightning_peft.zoo.entry import fingerprint

__all__ = ["LoRA"]


class LoRA(MethodCallback):
    """Fine-tune the backbone of any ``LightningModule`` with LoRA adapters.

    Hooks: ``setup`` injects the adapters and freezes the rest of the backbone, before
    ``configure_optimizers`` runs and before the strategy wraps the model, so the optimizer and
    DDP see only the trainable parameters (a module that already holds adapters from an earlier fit
    with the same settings keeps them; other settings are refused; a fit that fails before training
    takes the adapters out again); ``on_train_start`` logs the parameter counts;
    ``on_fit_end`` saves the adapter (peft format, safetensors) when ``save_dir`` is set.

    On several ranks every rank injects the same layers with the same initialisation (the
    strategy broadcasts rank 0's weights when it wraps the model); the adapter is gathered on every
    rank and written by rank 0 only.

    Args:
        r: rank of each adapter (> 0).
        alpha: scale numerator; the update is ``B @ A * alpha / r`` (> 0).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: which layers to adapt, relative to the backbone: a regex (``re.fullmatch``), a list of
            names or dotted suffixes, or ``"all-linear"``. Default: the backbone family's preset.
        exclude_modules: layers never adapted (same forms).
        modules_to_save: backbone modules trained in full and saved with the adapter, e.g. ``["head"]``.
        backbone: dotted attribute path of the backbone inside the ``LightningModule`` (``"model"``).
            Default: the first submodule of a known family (timm ViT, diffusers UNet/DiT, transformers
            Llama/GPT-2/AST/wav2vec2/Whisper), else the whole ``LightningModule``. Only the backbone is frozen;
            parameters of the ``LightningModule`` outside it keep their ``requires_grad``.
        init: ``"kaiming"`` (peft's default, starts as the identity), ``"gaussian"``, or ``"nonzero"`` (tests).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        save_dir: folder to write the trained adapter to at the end of fit (None: do not save).
        autocast_adapter_dtype: keep the adapters float32 beside a float16/bfloat16 or quantized base, also when
            ``precision="bf16-true"``/``"16-true"`` casts the module after ``setup`` (peft's default); False: the
            adapters take the base's dtype (and train in it).

    Raises:
        ValueError: on construction, for a rank, alpha or dropout out of range; in ``setup``, for targets that
            match nothing (listing what could match), or a backbone path that does not exist.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, modules_to_save=["head"])], logger=False)
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        init: InitKind = "kaiming",
        use_rslora: bool = False,
        save_dir: str | None = None,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            modules_to_save=modules_to_save or [],
            init=init,
            use_rslora=use_rslora,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        self._init_shell(config, backbone, save_dir)

    def _init_shell(self, config: LoRAConfig, backbone: str | None, save_dir: str | None) -> None:
        """State every adapter callback keeps (subclasses build their own config, then call this)."""
        self.config = config
        self.backbone = backbone
        self.save_dir = save_dir
        # r is not part of the key: a resume with another r must reach load_state_dict's clear error
        self._key = {"target_modules": config.target_modules, "backbone": backbone}
        self.adapted: list[str] = []
        self.backbone_path: str = ""
        self.saved_to: Path | None = None

    method = "lora"
    #: config fields that must be the same when resuming from a checkpoint
    resume_keys: tuple[str, ...] = ("r", "alpha", "use_rslora")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._key)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root, self.backbone_path, preset = resolve_backbone(pl_module, self.backbone)
        config = self.config
        if config.target_modules is None:
            if preset is None:
                raise ValueError(
                    f"{type(self).__name__}: no preset knows {type(root).__name__}, so target_modules must be given "
                    "(a regex, a list of module names/suffixes, or 'all-linear')"
                )
            config = dataclasses.replace(config, target_modules=list(self._preset_targets(preset)))
        settings = self.settings(config)
        present = any(True for _ in self._method_layers(root))
        if self.reuse_setup(root, settings, present, self.layers_what) is not None:  # a second fit/validate
            self.config = config
            self.adapted = [name for name, _ in self._method_layers(root)]
            return
        undo = restorer(root, lambda: self._remove(root))
        self.adapted = self._inject(root, config)
        self.config = config
        self.record_setup(root, settings, undo)
        # Every rank starts from rank 0's adapter init. DDP would broadcast it when wrapping the model, but
        # FSDP2 keeps each rank's own shard of its own init; this makes the start independent of the strategy.
        for _, layer in self._method_layers(root):
            for param in layer.parameters(recurse=False):
                distributed.broadcast_tensor(param.data)
        trainable, total = count_parameters(root)
        where = self.backbone_path or type(pl_module).__name__
        rank_zero_info(
            f"{type(self).__name__}: adapted {len(self.adapted)} layers of {where} "
            f"({self._describe(config)}); "
            f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
        )

    # the adapter kind, for subclasses that inject other layers through the same shell (SSF)
    layers_what = "LoRA layers"

    def _preset_targets(self, preset: Preset) -> tuple[str, ...]:
        return preset.target_modules

    def _method_layers(self, root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return adapter_layers(root)

    def _inject(self, root: nn.Module, config: Any) -> list[str]:
        return inject_adapters(root, config)

    def _remove(self, root: nn.Module) -> None:
        remove_adapters(root)

    def _describe(self, config: Any) -> str:
        return f"r={config.r}, alpha={config.alpha:g}"

    def _logged_hyperparameters(self) -> dict[str, Any]:
        return {"peft/r": self.config.r, "peft/alpha": self.config.alpha}

    def settings(self, config: LoRAConfig) -> dict[str, Any]:
        """What decides the adapters this callback injects (targets resolved), to tell a reusable setup apart."""
        return {"config": config.to_dict(), "backbone": self.backbone_path}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in on_fit_start: a resumed run's global_step is restored only after on_fit_start
        trainable, total = count_parameters(pl_module)
        stats = {
            "peft/trainable_params": trainable,
            "peft/total_params": total,
            "peft/adapted_layers": len(self.adapted),
        }
        for logger in trainer.loggers:
            logger.log_hyperparams({"peft/method": self.method, **self._logged_hyperparameters()})
            logger.log_metrics({k: float(v) for k, v in stats.items()}, step=trainer.global_step)

    @override
    def hyperparameters(self) -> dict[str, Any]:
        return self.config.to_dict()

    @override
    def base_fingerprint(self, root: nn.Module) -> dict[str, Any]:
        return fingerprint(root, exclude=self.config.modules_to_save)

    @override
    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        """Gather the adapter on every rank (sharded parameters become full tensors) and write it from rank 0.

        Must be called on all ranks. Returns the folder on rank 0, None elsewhere.
        """
        tensors = {
            k: distributed.full_tensor(v) for k, v in adapter_state_dict(root, self.config.modules_to_save).items()
        }
        config = peft_config(root, self.config)
        return distributed.rank_zero_only(write_adapter)(path, tensors, config)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "adapted": list(self.adapted), "backbone": self.backbone_path}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        mine = self.config.to_dict()
        differs = {k: (saved[k], mine[k]) for k in self.resume_keys if k in saved and saved[k] != mine[k]}
        if differs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs callback {b!r}" for k, (a, b) in differs.items())
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained with another adapter config ({detail}); "
                "resume with the same"
            )
