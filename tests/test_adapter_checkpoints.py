"""Adapter-only checkpoints (``AdapterCheckpoints``, issue #20 item 2): what they hold, exact resume, refusals.

Resume is tested after a real SIGKILL mid-epoch (``tests/scripts/killed_fit.py`` with ``ADAPTER_ONLY=1``), for every
method: the resumed run starts from a freshly built model, takes the frozen base from it, and must end bit-identical
to the uninterrupted run.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from test_resume_killed import run

from lightning_peft import LoRA
from lightning_peft.callbacks import ID3, AdapterCheckpoints
from lightning_peft.tasks import DigitsDataModule, ImageClassifier

TINY_VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2}


def classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("vit_tiny_patch16_224", model_kwargs=TINY_VIT, lr=1e-2)


def fit(module: ImageClassifier, tmp_path, callbacks: list, ckpt_path: str | None = None, steps: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, seed=3), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "lisa", "hft", "id3", "sara", "ssf", "spiel"])
def test_resume_from_an_adapter_only_checkpoint_after_sigkill_is_exact(method: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTER_ONLY", "1")
    straight = run(tmp_path / "straight", method, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "run", method, "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    record = checkpoint["lightning_peft"]
    assert record["adapter_only"] and record["left_out"], record.keys()
    assert not set(record["left_out"]) & set(checkpoint["state_dict"])
    resumed = run(tmp_path / "run", method, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took" in resumed.stderr + resumed.stdout  # the base came from the fresh model
    wa, wb = (load_file(str(tmp_path / d / "result.safetensors")) for d in ("straight", "run"))
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bit-identical, base weights included


def test_the_checkpoint_holds_what_trains_and_is_smaller(tmp_path) -> None:
    full = fit(classifier(), tmp_path / "full", [LoRA(r=2, modules_to_save=["head"])])
    full.save_checkpoint(tmp_path / "full.ckpt")
    only = AdapterCheckpoints()
    small = fit(classifier(), tmp_path / "small", [LoRA(r=2, modules_to_save=["head"]), only])
    small.save_checkpoint(tmp_path / "small.ckpt")
    a = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "small.ckpt", weights_only=True)["state_dict"]
    trainable = {n for n, p in small.lightning_module.named_parameters() if p.requires_grad}
    assert trainable <= set(b) and set(b) < set(a)
    frozen = {n for n, p in small.lightning_module.named_parameters() if not p.requires_grad}
    assert set(a) - set(b) == frozen  # exactly the frozen base is left out; buffers and what trains stay
    assert only.dropped_bytes > 5 * only.kept_bytes
    assert os.path.getsize(tmp_path / "small.ckpt") < os.path.getsize(tmp_path / "full.ckpt") / 2


def test_resuming_onto_another_base_is_refused_with_what_to_do(tmp_path) -> None:
    trainer = fit(classifier(), tmp_path / "a", [ID3(budget=50, total_steps=4), AdapterCheckpoints()])
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = classifier()
    with torch.no_grad():
        other.model.blocks[0].mlp.fc1.weight.add_(1.0)  # another base
    with pytest.raises(ValueError, match="base tensor.*differ.*freshly built model"):
        fit(other, tmp_path / "b", [ID3(budget=50, total_steps=4), AdapterCheckpoints()], str(tmp_path / "a.ckpt"), 6)


def test_needs_exactly_one_method_callback(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one method callback"):
        fit(classifier(), tmp_path, [AdapterCheckpoints()])


@pytest.mark.parametrize("adapter_only", [False, True])
def test_load_from_checkpoint_of_a_method_run_says_how_to_load_it(tmp_path, adapter_only: bool) -> None:
    callbacks: list = [LoRA(r=2, modules_to_save=["head"])] + ([AdapterCheckpoints()] if adapter_only else [])
    trainer = fit(classifier(), tmp_path, callbacks)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"ckpt_path=.*lightning_peft.zoo.load"):
        ImageClassifier.load_from_checkpoint(tmp_path / "run.ckpt", weights_only=True)
    plain = fit(classifier(), tmp_path / "plain", [])  # a run without a method: loads as Lightning always did
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    ImageClassifier.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=True)
