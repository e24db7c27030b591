"""Per-family backbone presets: what to adapt, where the repeated blocks are, what stays trainable.

A *preset* is the small amount of knowledge about a model family that every method needs and that
a user should not have to type: the default LoRA ``target_modules``, the dotted path of the
``nn.ModuleList`` that holds the repeated blocks (what LISA samples from, what AdaLoRA reports ranks
per), the modules LISA keeps trainable all the time (embeddings, final norm, head) and the task head.

Detection never imports ``transformers``, ``timm`` or ``diffusers``: it looks at class names, their
``__module__`` and, for transformers, at ``model.config.model_type``. It recognises the model *root*
(any head class: ``LlamaForCausalLM`` and ``LlamaModel`` are both ``hf-llama``);
:func:`find_backbone` finds that root inside a wrapper such as a ``LightningModule``.

Families and their defaults (``target_modules`` use peft list semantics: an entry ``t`` matches a
module name ``n`` iff ``n == t`` or ``n.endswith("." + t)``):

==================  ===========================================  =======================================
family              target_modules                               block_paths (first that exists wins)
==================  ===========================================  =======================================
``timm-vit``        attn.qkv, attn.proj, mlp.fc1, mlp.fc2        blocks
``diffusers-unet``  to_q, to_k, to_v, to_out.0                   down_blocks+mid_block+up_blocks
``diffusers-dit``   to_q, to_k, to_v, to_out.0, ff.net.0.proj,   transformer_blocks
                    ff.net.2
``hf-ast``          q_proj, k_proj, v_proj, o_proj, mlp.fc1,     audio_spectrogram_transformer.layers,
                    mlp.fc2  (transformers >= 5)                 layers
``hf-ast``          query, key, value, attention.output.dense,   audio_spectrogram_transformer.encoder
                    intermediate.dense, output.dense (< 5)       .layer, encoder.layer
``hf-wav2vec2``     q_proj, k_proj, v_proj, out_proj,            wav2vec2.encoder.layers, encoder.layers
                    feed_forward.intermediate_dense,
                    feed_forward.output_dense
``hf-whisper``      q_proj, k_proj, v_proj, out_proj, fc1, fc2   encoder.layers, model.encoder.layers,
                                                                 layers
``hf-llama``        q_proj, k_proj, v_proj, o_proj, gate_proj,   model.layers, layers
                    up_proj, down_proj
``hf-phi3``         qkv_proj, o_proj, gate_up_proj, down_proj    model.layers, layers
``hf-gpt2``         c_attn, c_proj, c_fc (``Conv1D``)            transformer.h, h
==================  ===========================================  =======================================

``hf-llama`` covers ``model_type`` llama, mistral, qwen2, qwen3, gemma and gemma2 (same layout);
``hf-whisper`` targets match the decoder too when the model has one, but its blocks are the encoder
layers. A family may have several layouts (AST changed its module names in transformers 5); the
layout whose block path exists in the model is picked. For a UNet the blocks are the down blocks,
the mid block and the up blocks, in that order. For a model no preset knows, :func:`find_blocks`
falls back to the largest ``nn.ModuleList`` of at least two children of one type.

Overriding: every callback takes ``target_modules=...`` (a list, or a regex string that is
``re.fullmatch``-ed), ``block_path="dotted.path.to.ModuleList"`` and the names to keep trainable;
an explicit value always wins over the preset. ``block_path`` may join several paths with ``"+"``.

Example:
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    >>> detect_preset(Net()) is None
    True
    >>> find_blocks(Net()).names
    ('layers.0', 'layers.1', 'layers.2')
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

__all__ = [
    "PRESETS",
    "Blocks",
    "NoBlocksError",
    "Preset",
    "default_target_modules",
    "detect_preset",
    "find_backbone",
    "find_blocks",
    "resolve_always_on",
]


@dataclass(frozen=True)
class Preset:
    """Defaults for one backbone family.

    Args:
        family: Family name, e.g. ``"timm-vit"`` or ``"hf-llama"``.
        target_modules: Default LoRA targets with peft list semantics: each entry matches a module
            name exactly or as a ``".suffix"``.
        block_paths: Candidate dotted paths (relative to the model) of the ``nn.ModuleList`` of
            repeated blocks, tried in order; ``"a+b"`` concatenates several.
        always_on: Dotted names of modules or parameters that LISA keeps trainable. Not every name
            exists in every variant of the family; filter them with :func:`resolve_always_on`.
        head: The task head module name(s), if any; also filter them with :func:`resolve_always_on`.
    """

    family: str
    target_modules: tuple[str, ...]
    block_paths: tuple[str, ...]
    always_on: tuple[str, ...]
    head: tuple[str, ...] = ()


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model, in forward order.

    Args:
        path: The dotted path of the block list; several joined by ``"+"`` when they were
            concatenated, e.g. ``"down_blocks+mid_block+up_blocks"``.
        names: Full dotted name of each block relative to the model, e.g. ``("blocks.0", ...)``.
        modules: The block modules, aligned with ``names``.
    """

    path: str
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def __len__(self) -> int:
        """Number of blocks."""
        return len(self.modules)


class NoBlocksError(ValueError):
    """Raised when the repeated blocks of a model cannot be found without help."""


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_ALWAYS_ON = ("model.embed_tokens", "embed_tokens", "model.norm", "norm", "lm_head", "score")

_PRESETS: dict[str, tuple[Preset, ...]] = {
    "timm-vit": (
        Preset(
            family="timm-vit",
            target_modules=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
            block_paths=("blocks",),
            always_on=(
                "patch_embed",
                "cls_token",
                "reg_token",
                "pos_embed",
                "norm",
                "fc_norm",
                "attn_pool",
                "head",
            ),
            head=("head",),
        ),
    ),
    "diffusers-unet": (
        Preset(
            family="diffusers-unet",
            target_modules=("to_q", "to_k", "to_v", "to_out.0"),
            block_paths=("down_blocks+mid_block+up_blocks",),
            always_on=(
                "conv_in",
                "time_embedding",
                "class_embedding",
                "add_embedding",
                "encoder_hid_proj",
                "conv_norm_out",
                "conv_out",
            ),
        ),
    ),
    "diffusers-dit": (
        Preset(
            family="diffusers-dit",
            target_modules=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
            block_paths=("transformer_blocks",),
            always_on=(
                "pos_embed",
                "norm",
                "proj_in",
                "adaln_single",
                "caption_projection",
                "norm_out",
                "scale_shift_table",
                "proj_out",
                "proj_out_1",
                "proj_out_2",
            ),
        ),
    ),
    "hf-ast": (
        Preset(  # transformers >= 5
            family="hf-ast",
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"),
            block_paths=("audio_spectrogram_transformer.layers", "layers"),
            always_on=(
                "audio_spectrogram_transformer.embeddings",
                "embeddings",
                "audio_spectrogram_transformer.layernorm",
                "layernorm",
                "classifier",
            ),
            head=("classifier",),
        ),
        Preset(  # transformers < 5
            family="hf-ast",
            target_modules=(
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ),
            block_paths=("audio_spectrogram_transformer.encoder.layer", "encoder.layer"),
            always_on=(
                "audio_spectrogram_transformer.embeddings",
                "embeddings",
                "audio_spectrogram_transformer.layernorm",
                "layernorm",
                "classifier",
            ),
            head=("classifier",),
        ),
    ),
    "hf-wav2vec2": (
        Preset(
            family="hf-wav2vec2",
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "out_proj",
                "feed_forward.intermediate_dense",
                "feed_forward.output_dense",
            ),
            block_paths=("wav2vec2.encoder.layers", "encoder.layers"),
            always_on=(
                "wav2vec2.feature_projection",
                "feature_projection",
                "wav2vec2.encoder.pos_conv_embed",
                "encoder.pos_conv_embed",
                "wav2vec2.encoder.layer_norm",
                "encoder.layer_norm",
                "projector",
                "classifier",
                "lm_head",
            ),
            head=("projector", "classifier", "lm_head"),
        ),
    ),
    "hf-whisper": (
        Preset(
            family="hf-whisper",
            target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            block_paths=("encoder.layers", "model.encoder.layers", "layers"),
            # embed_positions is left out on purpose: transformers keeps the encoder's sinusoidal
            # position table frozen.
            always_on=(
                "encoder.conv1",
                "encoder.conv2",
                "model.encoder.conv1",
                "model.encoder.conv2",
                "conv1",
                "conv2",
                "encoder.layer_norm",
                "model.encoder.layer_norm",
                "layer_norm",
                "projector",
                "classifier",
                "proj_out",
            ),
            head=("projector", "classifier", "proj_out"),
        ),
    ),
    "hf-llama": (
        Preset(
            family="hf-llama",
            target_modules=_LLAMA_TARGETS,
            block_paths=("model.layers", "layers"),
            always_on=_LLAMA_ALWAYS_ON,
            head=("lm_head", "score"),
        ),
    ),
    "hf-phi3": (
        Preset(
            family="hf-phi3",
            target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            block_paths=("model.layers", "layers"),
            always_on=_LLAMA_ALWAYS_ON,
            head=("lm_head", "score"),
        ),
    ),
    "hf-gpt2": (
        Preset(
            family="hf-gpt2",
            target_modules=("c_attn", "c_proj", "c_fc"),
            block_paths=("transformer.h", "h"),
            always_on=(
                "transformer.wte",
                "wte",
                "transformer.wpe",
                "wpe",
                "transformer.ln_f",
                "ln_f",
                "lm_head",
                "score",
            ),
            head=("lm_head", "score"),
        ),
    ),
}

PRESETS: Mapping[str, tuple[Preset, ...]] = MappingProxyType(_PRESETS)
"""Every known family and its layouts (several when module names changed between releases)."""

_TIMM_FAMILIES = {"VisionTransformer": "timm-vit"}
_DIFFUSERS_FAMILIES = {
    "UNet2DConditionModel": "diffusers-unet",
    "DiTTransformer2DModel": "diffusers-dit",
    "Transformer2DModel": "diffusers-dit",
    "PixArtTransformer2DModel": "diffusers-dit",
}
_HF_FAMILIES = {
    "llama": "hf-llama",
    "mistral": "hf-llama",
    "qwen2": "hf-llama",
    "qwen3": "hf-llama",
    "gemma": "hf-llama",
    "gemma2": "hf-llama",
    "phi3": "hf-phi3",
    "gpt2": "hf-gpt2",
    "audio-spectrogram-transformer": "hf-ast",
    "wav2vec2": "hf-wav2vec2",
    "whisper": "hf-whisper",
}


def _class_family(model: nn.Module, library: str, families: Mapping[str, str]) -> str | None:
    """Family of the first class in ``type(model).__mro__`` named in ``families`` and defined in ``library``."""
    for cls in type(model).__mro__:
        family = families.get(cls.__name__)
        if family is not None and cls.__module__.split(".")[0] == library:
            return family
    return None


def _is_hf_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, without importing transformers."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(model).__mro__
    )


def _family(model: nn.Module) -> str | None:
    family = _class_family(model, "timm", _TIMM_FAMILIES) or _class_family(model, "diffusers", _DIFFUSERS_FAMILIES)
    if family is None and _is_hf_pretrained(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        family = _HF_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return family


def detect_preset(model: nn.Module) -> Preset | None:
    """Return the preset of the family ``model`` (the root itself) belongs to.

    timm and diffusers models are recognised by class (``VisionTransformer`` and its subclasses,
    ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``,
    ``PixArtTransformer2DModel``), transformers models by ``model.config.model_type``, whatever
    their head class. Nothing is imported. When a family has several layouts, the first whose block
    path exists in ``model`` is returned (the first layout if none does).

    Args:
        model: The model root, not a wrapper around it (see :func:`find_backbone`).

    Returns:
        The preset, or ``None`` if the family is unknown.
    """
    family = _family(model)
    if family is None:
        return None
    layouts = _PRESETS[family]
    for preset in layouts:
        if any(_try_resolve(model, path) is not None for path in preset.block_paths):
            return preset
    return layouts[0]


def find_backbone(module: nn.Module) -> tuple[str, Preset] | None:
    """Find the first submodule of ``module`` (``module`` itself included) that a preset knows.

    Args:
        module: Any module, typically a ``LightningModule`` that holds the backbone as an attribute.

    Returns:
        ``(dotted name, preset)``, the name being ``""`` for ``module`` itself, or ``None``.
    """
    for name, sub in module.named_modules():
        preset = detect_preset(sub)
        if preset is not None:
            return name, preset
    return None


def default_target_modules(model: nn.Module) -> tuple[str, ...] | None:
    """Return the preset's default ``target_modules`` for the model root, or ``None`` if unknown.

    Args:
        model: The model root.

    Returns:
        The target entries (peft list semantics), or ``None``.
    """
    preset = detect_preset(model)
    return None if preset is None else preset.target_modules


def resolve_always_on(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Keep the names that exist in ``model`` as a module or a parameter.

    Args:
        model: The model the names are relative to.
        names: Dotted module or parameter names, e.g. a preset's ``always_on`` or ``head``.

    Returns:
        The existing names, in the given order, without duplicates.
    """
    existing = {name for name, _ in model.named_modules()}
    existing.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    kept: list[str] = []
    for name in names:
        if name in existing and name not in kept:
            kept.append(name)
    return kept


_LISTS = (nn.ModuleList, nn.Sequential)


def _get(model: nn.Module, path: str) -> tuple[object, str | None]:
    """Follow ``path`` attribute by attribute; return ``(object, None)`` or ``(None, what went wrong)``."""
    obj: object = model
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(obj, nn.Module):
            return None, f"'{'.'.join(walked)}' is {type(obj).__name__}, not a module"
        if part not in obj._modules and not hasattr(obj, part):
            where = f"'{'.'.join(walked)}' ({type(obj).__name__})" if walked else f"the model ({type(obj).__name__})"
            return None, f"{where} has no attribute '{part}'"
        obj = obj._modules[part] if part in obj._modules else getattr(obj, part)
        walked.append(part)
    return obj, None


def _resolve(model: nn.Module, path: str) -> Blocks:
    """Resolve an explicit (possibly ``"+"``-joined) block path; raise ``ValueError`` if it does not fit."""
    pieces = [piece.strip() for piece in path.split("+")]
    if not all(pieces):
        raise ValueError(f"block_path={path!r} has an empty piece. {_lists_hint(model)}")
    names: list[str] = []
    modules: list[nn.Module] = []
    for piece in pieces:
        obj, error = _get(model, piece)
        if error is not None:
            raise ValueError(f"block_path={path!r} does not exist: {error}. {_lists_hint(model)}")
        if isinstance(obj, _LISTS):
            names.extend(f"{piece}.{key}" for key in obj._modules)
            modules.extend(obj._modules.values())  # type: ignore[arg-type]
        elif obj is None and len(pieces) > 1:
            continue  # e.g. a UNet built with mid_block_type=None
        elif isinstance(obj, nn.Module) and len(pieces) > 1:
            names.append(piece)
            modules.append(obj)
        else:
            found = "None" if obj is None else type(obj).__name__
            raise ValueError(
                f"block_path={path!r} must name an nn.ModuleList or nn.Sequential of blocks, "
                f"but {piece!r} is a {found}. {_lists_hint(model)}"
            )
    if not modules:
        raise ValueError(f"block_path={path!r} holds no blocks. {_lists_hint(model)}")
    return Blocks(path="+".join(pieces), names=tuple(names), modules=tuple(modules))


def _try_resolve(model: nn.Module, path: str) -> Blocks | None:
    """Resolve a preset candidate path; ``None`` if any of its pieces is missing."""
    try:
        return _resolve(model, path)
    except ValueError:
        return None


def _child_types(container: nn.Module) -> str:
    types = list(dict.fromkeys(type(child).__name__ for child in container.children()))
    if not types:
        return "empty"
    return types[0] if len(types) == 1 else "mixed: " + ", ".join(types)


def _module_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            yield name, module


def _lists_hint(model: nn.Module) -> str:
    seen = [f"{name or '<root>'} (len {len(lst)}, {_child_types(lst)})" for name, lst in _module_lists(model)]
    return "ModuleLists in the model: " + ("; ".join(seen) if seen else "none") + "."


def _generic_blocks(model: nn.Module) -> Blocks | None:
    """The largest container of >= 2 same-type children that hold parameters; ModuleLists first."""
    best: tuple[tuple[int, int, int], str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, _LISTS) or not name:
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(child) for child in children}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params == 0:
            continue
        key = (int(isinstance(module, nn.ModuleList)), len(children), n_params)
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        return None
    _, name, module = best
    return Blocks(
        path=name,
        names=tuple(f"{name}.{key}" for key in module._modules),
        modules=tuple(module._modules.values()),  # type: ignore[arg-type]
    )


def find_blocks(model: nn.Module, path: str | None = None) -> Blocks:
    """Find the repeated blocks of ``model``.

    With ``path``, that dotted path must name an ``nn.ModuleList`` or ``nn.Sequential`` (several
    paths may be joined with ``"+"``; in a joined path a plain module counts as one block and a
    ``None`` attribute is skipped). Without it, the detected preset's ``block_paths`` are tried in
    order; for an unknown model (or when no candidate exists) the largest ``nn.ModuleList`` of at
    least two children of one type that hold parameters is taken, ties broken by parameter count
    (an ``nn.Sequential`` only if no ``nn.ModuleList`` qualifies).

    Args:
        model: The model root.
        path: Dotted path of the block list, relative to ``model``, e.g. ``"model.layers"``.

    Returns:
        The blocks with their full dotted names.

    Raises:
        ValueError: ``path`` does not exist or is not a ``ModuleList``/``Sequential``; the message
            says what was found and lists the ModuleLists of the model.
        NoBlocksError: ``path`` is ``None`` and no block list could be found.

    Example:
        >>> from torch import nn
        >>> find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ModuleList(nn.Linear(2, 2) for _ in range(2))), "1").names
        ('1.0', '1.1')
    """
    if path is not None:
        return _resolve(model, path)
    preset = detect_preset(model)
    if preset is not None:
        for candidate in preset.block_paths:
            blocks = _try_resolve(model, candidate)
            if blocks is not None:
                return blocks
    blocks = _generic_blocks(model)
    if blocks is None:
        raise NoBlocksError(
            f"Could not find the repeated blocks of {type(model).__name__}: no nn.ModuleList (or nn.Sequential) "
            f"with at least 2 children of one type that hold parameters. {_lists_hint(model)} "
            'Pass block_path="dotted.path.to.ModuleList" to name the list of blocks.'
        )
    return blocks
