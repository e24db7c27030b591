"""The ``SSF`` callback: a learned per-channel scale and shift after chosen layers (Lian et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from lightning_peft import distributed
from lightning_peft.adapters.ssf import (
    VIT_TARGETS,
    SSFConfig,
    SSFInit,
    inject_ssf,
    remove_ssf,
    ssf_config,
    ssf_layers,
    ssf_state_dict,
    write_ssf,
)
from lightning_peft.adapters.ssf.layer import _PREFIX as SSF_PREFIX
from lightning_peft.backbones import Preset
from lightning_peft.callbacks.lora import LoRA
from lightning_peft.strategies import check_data_parallel_only, is_model_parallel

__all__ = ["SSF"]

#: SSF's default targets per backbone family (the reference places SSF in ViTs; other families need target_modules)
PRESET_TARGETS: dict[str, tuple[str, ...]] = {"timm-vit": VIT_TARGETS}


class SSF(LoRA):
    """Fine-tune the backbone of any ``LightningModule`` with SSF: ``y = scale * layer(x) + shift`` per channel.

    The base is frozen; only the scales and shifts (two vectors per adapted layer, initialised to 1 and 0) and the
    ``modules_to_save`` (a new head) train. At export (:func:`lightning_peft.export`) each pair is merged into the
    layer it follows, so the exported model is the plain architecture. For a timm ViT the default targets follow the
    reference (``dongzelian/SSF``): the patch embedding, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
    ``norm1``, ``norm2`` of every block and the final ``norm``. Deliberate deviation: the reference also scales the
    output of the final norm when that is an ``nn.Identity`` (global average pooling with ``fc_norm``), which nothing
    could be merged into; here an ``nn.Identity`` is skipped. Any other model takes ``target_modules``: Linear,
    Conv2d, transformers Conv1D and LayerNorm layers with a bias (see :mod:`lightning_peft.adapters.ssf`).

    It shares :class:`LoRA`'s shell (the same hooks, one setup per module, resume checks, save on rank 0), with SSF
    layers instead of low-rank ones. Hooks: ``setup`` refuses FSDP1, DeepSpeed and tensor parallelism and injects
    the layers before ``configure_optimizers`` and before the strategy wraps the model; ``on_train_start`` logs the
    counts; ``on_fit_end`` saves (safetensors + ``adapter_config.json``, with the base fingerprint: a zoo entry) and
    draws how far each layer's scale and shift moved. Several ranks: the trainable set never changes, so plain
    ``strategy="ddp"`` (or ``ddp_selective``) keeps every rank identical; rank 0's init is broadcast at setup. FSDP2
    (``ModelParallelStrategy(tensor_parallel_size=1)``, the model sharded by :func:`lightning_peft.shard` in
    ``configure_model``) shards the scales and shifts with their block and gathers them once to save.

    Args:
        target_modules: layers to follow, relative to the backbone: a regex (``re.fullmatch``) or a list of names or
            dotted suffixes. Default: the family's SSF preset (timm ViT only).
        exclude_modules: layers never adapted (same forms).
        modules_to_save: backbone modules trained in full and saved with the adapter, e.g. ``["head"]``.
        backbone: dotted attribute path of the backbone inside the ``LightningModule``; default: detected.
        init: ``"identity"`` (scale 1, shift 0; the model starts as the base) or ``"normal"`` (the reference's
            ``N(1, 0.02)`` / ``N(0, 0.02)``).
        save_dir: folder to write the trained adapter to at the end of fit (None: do not save).

    Raises:
        ValueError: on construction, for an unknown ``init`` or empty targets; in ``setup``, for targets that match
            nothing or a model no SSF preset knows without ``target_modules``.
        TypeError: in ``setup``, a matched layer SSF cannot merge into (no bias, quantized).
        NotImplementedError: in ``setup``, FSDP1, DeepSpeed or ``ModelParallelStrategy`` with tensor parallelism
            (data-parallel FSDP2 is supported).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SSF(modules_to_save=["head"])], logger=False)
    """

    method = "ssf"
    resume_keys: tuple[str, ...] = ("init",)
    layers_what = "SSF layers"

    def __init__(
        self,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        backbone: str | None = None,
        init: SSFInit = "identity",
        save_dir: str | None = None,
    ) -> None:
        if target_modules is not None and len(target_modules) == 0:
            raise ValueError("SSF: target_modules is empty; pass a regex or a list of names, or None for the preset")
        config = SSFConfig(
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            modules_to_save=modules_to_save or [],
            init=init,
        )
        self._init_shell(config, backbone, save_dir)  # type: ignore[arg-type]
        self.moved: dict[str, dict[str, float]] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        super().setup(trainer, pl_module, stage)

    # ----------------------------------------------------------------------------------------- the adapter kind
    @override
    def _preset_targets(self, preset: Preset) -> tuple[str, ...]:
        if preset.family not in PRESET_TARGETS:
            raise ValueError(
                f"SSF has no default targets for the {preset.family} family (the reference places SSF in ViTs), so "
                "target_modules must be given (a regex or a list of Linear/Conv2d/LayerNorm names with biases)"
            )
        return PRESET_TARGETS[preset.family]

    @override
    def _method_layers(self, root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return ssf_layers(root)

    @override
    def _inject(self, root: nn.Module, config: Any) -> list[str]:
        return inject_ssf(root, config)

    @override
    def _remove(self, root: nn.Module) -> None:
        remove_ssf(root)

    @override
    def _describe(self, config: Any) -> str:
        return f"init={config.init}"

    @override
    def _logged_hyperparameters(self) -> dict[str, Any]:
        return {"peft/init": self.config.init}

    # ----------------------------------------------------------------------------------------- the result
    @override
    def save(self, root: nn.Module, path: str | Path) -> Path | None:
        """Gather the SSF tensors on every rank and write them from rank 0 (a collective). The folder on rank 0."""
        tensors = {k: distributed.full_tensor(v) for k, v in ssf_state_dict(root, self.config.modules_to_save).items()}
        self.moved = {"scale_change": {}, "shift": {}}
        for name, _ in ssf_layers(root):  # from the gathered tensors: under FSDP2 a layer holds only its shard
            scale, shift = (tensors[f"{SSF_PREFIX}{name}.ssf_{kind}"].float() for kind in ("scale", "shift"))
            self.moved["scale_change"][name] = float((scale - 1).abs().mean())
            self.moved["shift"][name] = float(shift.abs().mean())
        config = ssf_config(root, self.config)  # type: ignore[arg-type]
        return distributed.rank_zero_only(write_ssf)(path, tensors, config)

    @override
    def schedule(self) -> dict[str, Any]:
        return dict(self.moved)

    @override
    def write_pictures(self, folder: Path) -> list[Path]:
        if not self.moved.get("scale_change"):
            return []
        from lightning_peft.callbacks.plots import plot_ssf  # matplotlib only when a picture is wanted

        return [plot_ssf(self.moved["scale_change"], self.moved["shift"], folder / "ssf_scale_shift.png")]


def _check_strategy(strategy: object) -> None:
    """One device, data-parallel strategies and data-parallel FSDP2 (SSF's trainable set is static: plain DDP is right).

    Under ``ModelParallelStrategy`` the scales and shifts are sharded with their block by :func:`lightning_peft.shard`
    like LoRA's factors; tensor parallelism is refused (``shard`` refuses it too), as are FSDP1 and DeepSpeed.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
        return
    if is_model_parallel(strategy):
        check_data_parallel_only(strategy, "SSF")
        return
    raise NotImplementedError(
        f"SSF does not support {type(strategy).__name__} (its multi-process tests cover DDP and FSDP2). Use one "
        "device, strategy='ddp' / 'ddp_selective', or FSDP2: ModelParallelStrategy(tensor_parallel_size=1) with "
        "lightning_peft.shard in configure_model"
    )
