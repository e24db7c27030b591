"""Every ``examples/*.yaml`` trains a few steps through the real LightningCLI; the example tasks behave.

The end-to-end test globs the folder, so a new recipe is covered the day it is added. It runs each
recipe as written (model sizes included) for one epoch of 3 batches of 8 samples and one validation
batch, with the schedules that need a long run shortened (:data:`SHORT_SCHEDULE`), everything written
under ``tmp_path``. A recipe whose callback class does not exist fails here; it is never skipped.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_peft.callbacks import LoRA, MethodCallback
from lightning_peft.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
STEPS = 3

SHORT_SCHEDULE: dict[str, Any] = {
    "tinit": 0,  # AdaLoRA: prune from the first step ...
    "tfinal": 1,
    "deltaT": 1,
    "total_step": STEPS,
    "total_steps": STEPS,  # ID3: the whole budget is unmasked within the run
    "interval": 1,  # LISA: a new draw every step
    "reselection_steps": 3,  # SpIEL: an update after the first step's gradients
    "accumulation_steps": 1,
}
"""Callback arguments that tie a schedule to a long run (when a recipe sets them), and their value in a short run."""


def _load(recipe: Path) -> dict[str, Any]:
    return yaml.safe_load(recipe.read_text())


def _callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    return list((config.get("trainer") or {}).get("callbacks") or [])


def _resolve(class_path: str) -> type:
    """A recipe's ``class_path``: dotted, or a short name the CLI knows (lightning-peft's or Lightning's)."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    for module in ("lightning_peft.callbacks", "lightning.pytorch.callbacks", "lightning.pytorch.loggers"):
        found = getattr(importlib.import_module(module), class_path, None)
        if found is not None:
            return found
    raise AttributeError(f"no class named {class_path!r} in lightning_peft.callbacks or Lightning")


def _short_run(recipe: Path, root: Path) -> Path:
    """Write ``recipe`` with a short schedule and small batches beside ``root``, its runs under ``root``."""
    config = _load(recipe)
    trainer = config.setdefault("trainer", {})
    trainer.update(
        max_epochs=1,
        max_steps=-1,
        limit_train_batches=STEPS,
        limit_val_batches=1,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    for callback in _callbacks(config):
        args = callback.get("init_args") or {}
        args.update({k: v for k, v in SHORT_SCHEDULE.items() if k in args})
    data = config.get("data") or {}
    parameters = inspect.signature(_resolve(data["class_path"])).parameters if "class_path" in data else {}
    small = {"batch_size": 8, "train_size": 64, "val_size": 64}  # the last two: what a head-only baseline reads
    data.setdefault("init_args", {}).update({k: v for k, v in small.items() if k in parameters})
    path = root.parent / recipe.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_there_are_examples_for_every_family() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "vit_lora",
        "vit_adalora",
        "vit_ssf",
        "unet_lora",
        "dit_lora",
        "audio_adalora",
        "llama_adalora",
        "llama_hft",
        "llama_spiel",
        "minilm_lora",
    } <= names


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_example_callbacks_exist(recipe: Path) -> None:
    for callback in _callbacks(_load(recipe)):
        cls = _resolve(callback["class_path"])  # an AttributeError / ImportError here names the missing class
        assert issubclass(cls, Callback), f"{recipe.name}: {callback['class_path']} is not a Lightning Callback"


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_example_trains(recipe: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the recipes' relative paths (runs/..., the loggers) land in tmp_path
    monkeypatch.setenv("LIGHTNING_PEFT_ZOO", str(tmp_path / "zoo"))
    cli = build_cli(["fit", "--config", str(_short_run(recipe, tmp_path / "runs"))])
    trainer = cli.trainer
    assert trainer.global_step == STEPS
    assert any(k.startswith("val_") for k in trainer.callback_metrics), dict(trainer.callback_metrics)
    assert all(torch.isfinite(v).all() for v in trainer.callback_metrics.values())
    wanted = [_resolve(c["class_path"]) for c in _callbacks(_load(recipe))]
    for cls in wanted:
        assert any(isinstance(cb, cls) for cb in trainer.callbacks), f"{cls.__name__} was not instantiated"
    methods = [cb for cb in trainer.callbacks if isinstance(cb, MethodCallback)]
    assert methods, f"{recipe.name} uses no PEFT method callback"
    for method in methods:
        if isinstance(method, LoRA):
            assert method.adapted, f"{type(method).__name__} adapted no layer"
        if method.save_dir is not None:
            assert method.saved_to is not None and any(method.saved_to.iterdir()), "the result was not saved"
            assert method.saved_to.resolve().is_relative_to(tmp_path.resolve())
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in cli.model.parameters())


# ----------------------------------------------------------------------------- the tasks themselves


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_denoising_loss_decreases_on_a_fixed_batch(arch: str) -> None:
    from lightning_peft.tasks import DenoisingModule

    torch.manual_seed(0)
    module = DenoisingModule(arch, sample_size=8, width=16, depth=2, num_heads=2, lr=3e-3)
    images, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(15):
        loss = module.denoising_loss(images, labels, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    module.eval()
    samples = module.generate(torch.tensor([1, 2]), num_inference_steps=2)
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_optimizer_takes_exactly_the_trainable_parameters_at_configure_time() -> None:
    from lightning_peft.tasks import CausalLMModule

    module = CausalLMModule(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    module.model.model.layers[0].requires_grad_(False)  # what a callback's setup does before the optimizer exists
    (group,) = module.configure_optimizers().param_groups
    wanted = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == wanted and 0 < len(wanted) < len(list(module.parameters()))


def test_audio_data_is_deterministic_and_class_separable() -> None:
    from lightning_peft.tasks import TwoNoteMelodyDataModule

    def make(seed: int) -> TwoNoteMelodyDataModule:
        dm = TwoNoteMelodyDataModule(num_classes=6, samples_per_class=40, num_mel_bins=16, max_length=32, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    (x, y), (xv, yv) = a.train_set.tensors, a.val_set.tensors
    assert torch.bincount(y).tolist() == [30] * 6 and torch.bincount(yv).tolist() == [10] * 6
    # nearest class mean on the whole spectrogram: the classes are separable ...
    centroids = torch.stack([x[y == k].flatten(1).mean(0) for k in range(6)])
    assert (torch.cdist(xv.flatten(1), centroids).argmin(1) == yv).float().mean() > 0.8
    # ... but not from the average spectrum: a melody and its reverse hold the same two pitches
    melodies = a.melodies().tolist()
    assert all([j, i] in melodies for i, j in melodies)


def test_docstring_corpus_blocks_are_bytes_and_the_split_is_fixed() -> None:
    from lightning_peft.tasks import DocstringCorpusDataModule

    dm = DocstringCorpusDataModule(modules=["json", "textwrap"], block_size=64)
    dm.setup("fit")
    train, val = dm.train_set.tensors[0], dm.val_set.tensors[0]
    assert train.shape[1] == val.shape[1] == 64 and int(train.max()) < dm.vocab_size == 256
    assert dm.decode(train[0]).startswith("JSON (JavaScript Object Notation)")
    again = DocstringCorpusDataModule(modules=["json", "textwrap"], block_size=64)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], val)


def test_sentiment_validation_adjectives_are_never_seen_in_training() -> None:
    from lightning_peft.tasks import SentimentTemplatesDataModule
    from lightning_peft.tasks.text import _NEGATIVE, _POSITIVE

    train, val = SentimentTemplatesDataModule(seed=0).sentences()
    assert len(train) == 480 and len(val) == 240

    def adjectives(pairs: list[tuple[str, int]]) -> set[str]:
        return {w.strip(".,!") for s, _ in pairs for w in s.split()} & {*_POSITIVE, *_NEGATIVE}

    assert len(adjectives(train)) == 40 and len(adjectives(val)) == 20 and not adjectives(train) & adjectives(val)
    assert sorted({label for _, label in val}) == [0, 1]


def test_pretrained_switches_load_local_checkpoints(tmp_path: Path) -> None:
    """The ``pretrained`` path of every task, fed by tiny checkpoints saved here (what the Hub would give)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import ASTConfig, ASTForAudioClassification, LlamaConfig, LlamaForCausalLM

    from lightning_peft.tasks import AudioClassifier, CausalLMModule, DenoisingModule

    dit = DenoisingModule("dit", sample_size=4, in_channels=4, width=16, depth=1, num_heads=2)
    dit.model.save_pretrained(tmp_path / "pipe/transformer")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "pipe/scheduler")
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    vae.save_pretrained(tmp_path / "pipe/vae")
    loaded = DenoisingModule("dit", pretrained=str(tmp_path / "pipe"), vae=True)
    assert torch.equal(loaded.model.proj_out_2.weight, dit.model.proj_out_2.weight) and loaded.model.training
    assert [p for p in loaded.vae.parameters() if p.requires_grad] == []
    images = torch.rand(2, 3, 8, 8) * 2 - 1  # 8x8 RGB -> 4x4x4 latents
    assert loaded.encode(images).shape == (2, 4, 4, 4)
    assert torch.isfinite(loaded.denoising_loss(images, torch.tensor([0, 1])))

    config = ASTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_mel_bins=16,
        max_length=32,
        frequency_stride=8,
        time_stride=8,
        num_labels=5,
    )
    ASTForAudioClassification(config).save_pretrained(tmp_path / "ast")
    audio = AudioClassifier(num_classes=3, pretrained=str(tmp_path / "ast"))
    assert audio(torch.zeros(2, 32, 16)).shape == (2, 3)

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(tmp_path / "llama")
    lm = CausalLMModule(pretrained=str(tmp_path / "llama"))
    assert lm.model.config.vocab_size == 300 and lm.model.training


def test_a_recipe_with_a_missing_callback_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = _load(ROOT / "examples/vit_lora.yaml")
    config["trainer"]["callbacks"] = [{"class_path": "NotAMethod", "init_args": {"r": 8}}]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(AttributeError, match="NotAMethod"):
        _resolve("NotAMethod")
    with pytest.raises(SystemExit):  # the CLI refuses it too (jsonargparse's error exit)
        build_cli(["fit", "--config", str(tmp_path / "broken.yaml")])
