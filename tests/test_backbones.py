"""Backbone presets on the tiny model of every family: detection, targets, blocks, always-on names."""

from __future__ import annotations

import functools
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_peft.backbones import (
    PRESETS,
    Blocks,
    NoBlocksError,
    Preset,
    default_target_modules,
    detect_preset,
    find_backbone,
    find_blocks,
    resolve_always_on,
)

try:
    import tiny_models
except ImportError:  # tests/ collected as a package
    from tests import tiny_models

# family -> (preset family, block path, block names)
EXPECTED: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "vit": ("timm-vit", "blocks", ("blocks.0", "blocks.1")),
    "unet": (
        "diffusers-unet",
        "down_blocks+mid_block+up_blocks",
        ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"),
    ),
    "dit": ("diffusers-dit", "transformer_blocks", ("transformer_blocks.0", "transformer_blocks.1")),
    "ast": (
        "hf-ast",
        "audio_spectrogram_transformer.layers",
        ("audio_spectrogram_transformer.layers.0", "audio_spectrogram_transformer.layers.1"),
    ),
    "wav2vec2": ("hf-wav2vec2", "wav2vec2.encoder.layers", ("wav2vec2.encoder.layers.0", "wav2vec2.encoder.layers.1")),
    "whisper": ("hf-whisper", "encoder.layers", ("encoder.layers.0", "encoder.layers.1")),
    "llama": ("hf-llama", "model.layers", ("model.layers.0", "model.layers.1")),
    "gpt2": ("hf-gpt2", "transformer.h", ("transformer.h.0", "transformer.h.1")),
    "mlp": (None, "blocks", ("blocks.0", "blocks.1", "blocks.2")),
}
KNOWN = [name for name, (family, _, _) in EXPECTED.items() if family is not None]


@functools.cache
def model(name: str) -> nn.Module:
    """One tiny model per family for the whole module (no test here mutates it)."""
    return tiny_models.FAMILIES[name]()


def matches(target: str, name: str) -> bool:
    """peft list semantics: exact name or ``.suffix``."""
    return name == target or name.endswith("." + target)


def adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "Conv1D"


def test_every_family_has_a_tiny_model() -> None:
    assert set(EXPECTED) == set(tiny_models.FAMILIES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detect_preset(name: str) -> None:
    family = EXPECTED[name][0]
    preset = detect_preset(model(name))
    assert (preset and preset.family) == family
    assert default_target_modules(model(name)) == (preset.target_modules if preset else None)


@pytest.mark.parametrize("name", KNOWN)
def test_targets_match_only_adaptable_layers(name: str) -> None:
    preset = detect_preset(model(name))
    assert preset is not None
    modules = dict(model(name).named_modules())
    for target in preset.target_modules:
        hits = {n: m for n, m in modules.items() if matches(target, n)}
        assert hits, f"{name}: target {target!r} matches nothing"
        wrong = {n: type(m).__name__ for n, m in hits.items() if not adaptable(m)}
        assert not wrong, f"{name}: target {target!r} matches non-adaptable modules {wrong}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_find_blocks(name: str) -> None:
    _, path, names = EXPECTED[name]
    blocks = find_blocks(model(name))
    assert isinstance(blocks, Blocks)
    assert blocks.path == path
    assert blocks.names == names
    assert len(blocks) == len(names)
    for block_name, module in zip(blocks.names, blocks.modules, strict=True):
        assert model(name).get_submodule(block_name) is module


@pytest.mark.parametrize("name", KNOWN)
def test_every_target_lives_in_a_block_or_is_listed(name: str) -> None:
    """The preset's targets sit inside the repeated blocks (what LISA and AdaLoRA reason about)."""
    preset = detect_preset(model(name))
    blocks = find_blocks(model(name))
    hits = [n for n, _ in model(name).named_modules() if any(matches(t, n) for t in preset.target_modules)]
    assert all(any(n.startswith(b + ".") for b in blocks.names) for n in hits)


@pytest.mark.parametrize("name", KNOWN)
def test_always_on_and_head_resolve(name: str) -> None:
    preset = detect_preset(model(name))
    always_on = resolve_always_on(model(name), preset.always_on)
    assert always_on, f"{name}: no always-on name exists"
    existing = {n for n, _ in model(name).named_modules()}
    existing |= {n for n, _ in model(name).named_parameters(remove_duplicate=False)}
    assert set(always_on) <= existing
    assert all(resolve_always_on(model(name), [entry]) == [] for entry in set(preset.always_on) - existing)
    trainable = {n for n, _ in model(name).named_parameters(remove_duplicate=False)}
    assert any(p == e or p.startswith(e + ".") for e in always_on for p in trainable), "nothing to keep on"
    head = resolve_always_on(model(name), preset.head)
    assert set(head) <= set(always_on)
    if preset.head:
        assert head, f"{name}: head {preset.head} not found"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_find_backbone_in_a_wrapper(name: str) -> None:
    wrapper = nn.Module()
    wrapper.loss = nn.CrossEntropyLoss()
    wrapper.model = model(name)
    found = find_backbone(wrapper)
    family = EXPECTED[name][0]
    if family is None:
        assert found is None
    else:
        assert found == ("model", detect_preset(model(name)))
        assert find_backbone(model(name)) == ("", detect_preset(model(name)))


def test_unet_root_wins_over_its_inner_transformer() -> None:
    inner = model("unet").down_blocks[0].attentions[0]
    assert detect_preset(inner).family == "diffusers-dit"
    assert find_backbone(model("unet"))[1].family == "diffusers-unet"


def test_unet_without_mid_block() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**{**model("unet").config, "mid_block_type": None})
    assert unet.mid_block is None
    assert find_blocks(unet).names == ("down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1")


def test_generic_fallback_picks_the_largest_same_type_list() -> None:
    net = tiny_models.tiny_mlp()
    net.heads = nn.ModuleList([nn.Linear(32, 4), nn.Linear(32, 2)])  # shorter: loses
    net.drops = nn.ModuleList(nn.Dropout() for _ in range(5))  # longer but no parameters: ignored
    net.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()])  # mixed types: ignored
    blocks = find_blocks(net)
    assert blocks.path == "blocks"
    assert blocks.modules == tuple(net.blocks)


def test_explicit_path() -> None:
    llama = model("llama")
    assert find_blocks(llama, "model.layers").modules == tuple(llama.model.layers)
    assert find_blocks(model("vit"), "blocks").names == ("blocks.0", "blocks.1")  # an nn.Sequential
    assert find_blocks(model("unet"), "up_blocks").names == ("up_blocks.0", "up_blocks.1")
    joined = find_blocks(model("unet"), "down_blocks+mid_block")
    assert joined.path == "down_blocks+mid_block"
    assert joined.names == ("down_blocks.0", "down_blocks.1", "mid_block")
    # a "+"-joined path round-trips
    default = find_blocks(model("unet"))
    assert find_blocks(model("unet"), default.path) == default


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("model.nope", "has no attribute 'nope'"),
        ("nope", "has no attribute 'nope'"),
        ("lm_head", "is a Linear"),
        ("model.layers.0", "is a LlamaDecoderLayer"),
    ],
)
def test_bad_path(path: str, expected: str) -> None:
    with pytest.raises(ValueError, match="block_path") as info:
        find_blocks(model("llama"), path)
    message = str(info.value)
    assert repr(path) in message
    assert expected in message
    assert "model.layers (len 2, LlamaDecoderLayer)" in message
    assert not isinstance(info.value, NoBlocksError)


def test_no_blocks() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(NoBlocksError, match='block_path="dotted.path.to.ModuleList"') as info:
        find_blocks(net)
    assert "Sequential" in str(info.value)
    assert isinstance(info.value, ValueError)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(2, 2), nn.GELU()])

    with pytest.raises(NoBlocksError, match=r"parts \(len 2, mixed: Linear, GELU\)"):
        find_blocks(Odd())


def test_resolve_always_on_filters_missing_names() -> None:
    vit = model("vit")
    names = ["cls_token", "reg_token", "patch_embed", "blocks.0.attn.qkv.weight", "nope", "head", "cls_token"]
    assert resolve_always_on(vit, names) == ["cls_token", "patch_embed", "blocks.0.attn.qkv.weight", "head"]
    assert resolve_always_on(vit, []) == []
    # a tied weight is found under both of its names
    gpt2 = model("gpt2")
    assert resolve_always_on(gpt2, ["lm_head.weight", "transformer.wte.weight"]) == [
        "lm_head.weight",
        "transformer.wte.weight",
    ]


def _fake_hf(model_type: str, pretrained: bool = True) -> nn.Module:
    """A module that looks like a transformers model to detection (class names and module only)."""
    base = type("PreTrainedModel", (nn.Module,), {"__module__": "transformers.modeling_utils"})
    cls = type("FakeModel", (base if pretrained else nn.Module,), {"__module__": "transformers.models.fake"})
    module = cls()
    module.config = SimpleNamespace(model_type=model_type)
    return module


def test_ast_layout_before_transformers_5() -> None:
    """transformers < 5 named AST's modules like ViT's: encoder.layer.N.attention.attention.query, ..."""
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.attention = nn.Module()
    for proj in ("query", "key", "value"):
        setattr(layer.attention.attention, proj, nn.Linear(4, 4))
    layer.attention.output = nn.Module()
    layer.attention.output.dense = nn.Linear(4, 4)
    layer.intermediate = nn.Module()
    layer.intermediate.dense = nn.Linear(4, 8)
    layer.output = nn.Module()
    layer.output.dense = nn.Linear(8, 4)
    fake = _fake_hf("audio-spectrogram-transformer")
    fake.audio_spectrogram_transformer = nn.Module()
    fake.audio_spectrogram_transformer.encoder = nn.Module()
    fake.audio_spectrogram_transformer.encoder.layer = nn.ModuleList([layer])
    fake.classifier = nn.Linear(4, 2)
    preset = detect_preset(fake)
    assert preset == PRESETS["hf-ast"][1]
    assert find_blocks(fake).names == ("audio_spectrogram_transformer.encoder.layer.0",)
    names = [n for n, _ in fake.named_modules()]
    for target in preset.target_modules:
        assert any(matches(target, n) for n in names), target
    # the transformers 5 layout is picked for the real tiny model
    assert detect_preset(model("ast")) == PRESETS["hf-ast"][0]


def test_detection_needs_a_known_pretrained_model() -> None:
    assert detect_preset(_fake_hf("bert")) is None
    assert detect_preset(_fake_hf("llama", pretrained=False)) is None  # e.g. a module with a config attribute
    assert detect_preset(_fake_hf("mistral")).family == "hf-llama"
    assert detect_preset(_fake_hf("phi3")).family == "hf-phi3"
    assert detect_preset(nn.Linear(2, 2)) is None


def test_presets_are_well_formed() -> None:
    for family, layouts in PRESETS.items():
        assert layouts
        for preset in layouts:
            assert isinstance(preset, Preset)
            assert preset.family == family
            assert preset.target_modules and preset.block_paths
            assert len(set(preset.target_modules)) == len(preset.target_modules)


def test_import_stays_light() -> None:
    code = (
        "import sys, lightning_peft.backbones; "
        "heavy = [m for m in ('transformers', 'lightning', 'timm', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_model_forward_is_deterministic(name: str) -> None:
    net = model(name)
    assert net.training
    state = torch.random.get_rng_state()
    first = tiny_models.forward(name, net)
    second = tiny_models.forward(name, net)
    assert torch.equal(first, second)  # no dropout, layerdrop, SpecAugment or label dropout in train mode
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(first, tiny_models.forward(name, net, seed=1))
    assert first.shape[0] == 2 and torch.isfinite(first).all()
    rebuilt = tiny_models.FAMILIES[name]()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), rebuilt.state_dict().values(), strict=True))
