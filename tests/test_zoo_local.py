"""The local zoo: publish -> search -> download -> load, revisions, integrity, names, interrupted publishes, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import FAMILIES, forward
from torch import nn

from lightning_peft import zoo
from lightning_peft.adapters import (
    AdaLoRAConfig,
    AdapterMismatchError,
    LoRAConfig,
    adapter_layers,
    inject_adapters,
)
from lightning_peft.zoo import EntryError, FingerprintMismatchError, LocalZoo
from lightning_peft.zoo.cli import main as zoo_cli


def trained(name: str = "llama", seed: int = 0, config: LoRAConfig | None = None) -> tuple[nn.Module, LoRAConfig]:
    model = FAMILIES[name](seed=seed).eval()
    config = config or LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init="nonzero")
    torch.manual_seed(seed + 7)
    inject_adapters(model, config)
    return model, config


@pytest.fixture
def local(tmp_path) -> LocalZoo:
    return LocalZoo(tmp_path / "zoo")


def test_publish_search_download_load_gives_the_same_outputs(local) -> None:
    model, config = trained()
    out = forward("llama", model)
    revision = zoo.publish(model, "llama-qv", config, zoo=local, base_model="tiny/llama", metrics={"val_loss": 0.5})
    (entry,) = zoo.search("qv", zoo=local)
    assert (entry.name, entry.revision, entry.method, entry.base_model) == ("llama-qv", revision, "lora", "tiny/llama")
    assert entry.metrics == {"val_loss": 0.5}
    assert zoo.search("qv", method="adalora", zoo=local) == [] and zoo.search(base_model="other", zoo=local) == []
    folder = zoo.download("llama-qv", zoo=local)
    assert {p.name for p in folder.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "lightning_peft.json",
        "README.md",
    }
    card = (folder / "README.md").read_text()
    assert "library_name: lightning-peft" in card and "base_model: tiny/llama" in card and "- lora" in card
    assert "`PeftModel.from_pretrained(base_model, FOLDER)`" in card  # the loaders that read it
    assert "lightning-peft zoo export llama-qv --base BASE --out DIR`" in card
    assert "peft-shira" not in card and "diffusers-lora" not in card  # not a sparse result, not a UNet
    fresh = FAMILIES["llama"](seed=0).eval()
    manifest = zoo.load(fresh, "llama-qv", zoo=local)
    assert manifest["method"] == "lora" and len(list(adapter_layers(fresh))) == 4
    torch.testing.assert_close(forward("llama", fresh), out)


def test_adalora_entry_keeps_its_rank_pattern(local) -> None:
    config = AdaLoRAConfig(r=4, target_r=2, alpha=8, target_modules=["q_proj", "v_proj"], init="nonzero", total_step=10)
    model, _ = trained(config=config)
    for i, (_, layer) in enumerate(adapter_layers(model)):
        layer.shrink(torch.tensor([True, i % 2 == 0, False, True]))
    out = forward("llama", model)
    zoo.publish(model, "llama-ada", config, zoo=local)
    manifest = json.loads((zoo.download("llama-ada", zoo=local) / "lightning_peft.json").read_text())
    assert manifest["method"] == "adalora" and sorted(set(manifest["schedule"]["final_ranks"].values())) == [2, 3]
    fresh = FAMILIES["llama"](seed=0).eval()
    zoo.load(fresh, "llama-ada", zoo=local)
    torch.testing.assert_close(forward("llama", fresh), out)


def test_revisions(local) -> None:
    model, config = trained()
    first = zoo.publish(model, "e", config, zoo=local)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.add_(1.0)
    second = zoo.publish(model, "e", config, zoo=local)
    assert first != second and local.revisions("e") == [first, second]
    assert local.info("e").revision == second
    old = FAMILIES["llama"](seed=0).eval()
    zoo.load(old, "e", revision=first[:8], zoo=local)  # a prefix resolves
    new = FAMILIES["llama"](seed=0).eval()
    zoo.load(new, "e", zoo=local)
    assert not torch.allclose(forward("llama", old), forward("llama", new))
    with pytest.raises(FileNotFoundError, match="revision 'deadbeef'"):
        zoo.download("e", revision="deadbeef", zoo=local)


def test_tampered_file_is_rejected(local) -> None:
    model, config = trained()
    zoo.publish(model, "t", config, zoo=local)
    folder = local.download("t")
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    fresh = FAMILIES["llama"](seed=0)
    with pytest.raises(EntryError, match="adapter_model.safetensors has sha256"):
        zoo.load(fresh, "t", zoo=local)
    assert not list(adapter_layers(fresh))


def test_pickle_in_an_entry_is_refused(local) -> None:
    model, config = trained()
    zoo.publish(model, "p", config, zoo=local)
    folder = local.download("p")
    torch.save({"x": 1}, folder / "extra.bin")
    with pytest.raises(EntryError, match="pickle"):
        zoo.load(FAMILIES["llama"](seed=0), "p", zoo=local)


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/b", "..", "", "-dash-first", "x" * 200])
def test_names_cannot_leave_the_zoo(local, bad: str, tmp_path) -> None:
    model, config = trained()
    entry = tmp_path / "built"
    zoo.build_entry(entry, model, config, "ok")  # a valid entry: only the name can be at fault
    with pytest.raises(ValueError, match="invalid zoo entry name"):
        local.publish(entry, bad)
    with pytest.raises(ValueError, match="invalid zoo entry name"):
        zoo.publish(model, bad, config, zoo=local)
    assert not local.root.exists() and not list(tmp_path.glob("escape*"))


def test_other_base_weights_are_refused_with_what_differs(local) -> None:
    model, config = trained(seed=0)
    zoo.publish(model, "b", config, zoo=local)
    other = FAMILIES["llama"](seed=1)  # same architecture, other weights
    keys = list(other.state_dict())
    with pytest.raises(FingerprintMismatchError, match=r"have other values or shapes \(first: "):
        zoo.load(other, "b", zoo=local)
    assert list(other.state_dict()) == keys  # untouched
    zoo.load(other, "b", zoo=local, allow_base_mismatch=True)  # the explicit override
    assert len(list(adapter_layers(other))) == 4


def test_other_architecture_is_refused_naming_the_first_mismatch(local) -> None:
    model, config = trained()
    zoo.publish(model, "arch", config, zoo=local)
    gpt2 = FAMILIES["gpt2"](seed=0)
    keys = list(gpt2.state_dict())
    with pytest.raises(FingerprintMismatchError, match="missing here"):
        zoo.load(gpt2, "arch", zoo=local)
    with pytest.raises(AdapterMismatchError, match="does not have"):
        zoo.load(gpt2, "arch", zoo=local, allow_base_mismatch=True)
    assert list(gpt2.state_dict()) == keys


def test_missing_entry_lists_what_exists(local) -> None:
    model, config = trained()
    zoo.publish(model, "here", config, zoo=local)
    with pytest.raises(FileNotFoundError, match="entries: here"):
        zoo.download("nothere", zoo=local)


def test_a_publish_killed_mid_write_leaves_no_entry(tmp_path) -> None:
    model, config = trained()
    entry = tmp_path / "built"
    zoo.build_entry(entry, model, config, "k")
    script = textwrap.dedent(f"""
        import os, shutil, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from lightning_peft.zoo import LocalZoo
        real = shutil.copyfile  # what copytree's copy2 calls for each file
        count = [0]
        def dying_copy(src, dst, *a, **k):
            count[0] += 1
            if count[0] == 2:  # after one file is written, die hard
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)
        shutil.copyfile = dying_copy
        LocalZoo({str(tmp_path / "zoo")!r}).publish({str(entry)!r}, "k")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    local = LocalZoo(tmp_path / "zoo")
    assert local.list() == [] and local.revisions("k") == []
    with pytest.raises((FileNotFoundError, EntryError)):
        local.download("k")
    # the next publish works and cleans nothing it should not
    revision = local.publish(entry, "k")
    assert local.revisions("k") == [revision]


def test_search_finds_what_a_user_types(local) -> None:
    model, config = trained()
    zoo.publish(model, "llama-qv", config, zoo=local, base_model="org/tiny-llama-v1")
    found = lambda *a, **k: [e.name for e in zoo.search(*a, zoo=local, **k)]  # noqa: E731
    assert found(method="LoRA") == found(method="lora") == ["llama-qv"]  # the method in any case
    assert found(base_model="tiny") == found(base_model="TINY-LLAMA") == ["llama-qv"]  # a substring of the base
    assert found("tiny-llama") == found("LORA") == found("QV") == ["llama-qv"]  # query: name, method, base, tags
    assert found("lightning-peft") == ["llama-qv"]
    assert found(method="lisa") == found(base_model="mistral") == found("nothing-like-this") == []


def test_cli_search_finds_what_a_user_types(local, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    model, config = trained()
    zoo.publish(model, "llama-qv", config, zoo=local, base_model="org/tiny-llama-v1")
    root = ["--root", str(local.root)]
    assert zoo_cli(["search", "--method", "LoRA", "--base-model", "tiny", *root]) == 0
    assert "llama-qv" in capsys.readouterr().out
    assert zoo_cli(["search", "TINY-LLAMA", *root]) == 0 and "llama-qv" in capsys.readouterr().out
    assert zoo_cli(["search", "--method", "LISA", *root]) == 0 and "llama-qv" not in capsys.readouterr().out


def test_cli_list_search_info_download_rm(local, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    model, config = trained()
    revision = zoo.publish(model, "cli-entry", config, zoo=local, metrics={"val_acc": 0.875})
    root = ["--root", str(local.root)]
    assert zoo_cli(["list", *root]) == 0
    out = capsys.readouterr().out
    assert "cli-entry" in out and revision[:12] in out and "val_acc=0.875" in out
    assert zoo_cli(["search", "cli", "--method", "lora", *root]) == 0 and "cli-entry" in capsys.readouterr().out
    assert zoo_cli(["info", "cli-entry", *root]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["metrics"] == {"val_acc": 0.875}
    assert zoo_cli(["download", "cli-entry", "--to", str(tmp_path / "copy"), *root]) == 0
    assert (tmp_path / "copy" / "adapter_model.safetensors").is_file()
    assert zoo_cli(["push", str(tmp_path / "copy"), "pushed", *root]) == 0
    assert zoo_cli(["rm", "cli-entry", *root]) == 2  # not a terminal and no --yes: refuses
    assert "pass --yes" in capsys.readouterr().err
    assert zoo_cli(["rm", "cli-entry", "--yes", *root]) == 0
    assert [e.name for e in local.list()] == ["pushed"]
    assert zoo_cli(["download", "gone", *root]) == 2 and "no entry 'gone'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "id3"])
def test_a_callbacks_save_dir_is_an_entry_that_zoo_push_publishes(method: str, local, tmp_path, capsys) -> None:
    from lit_helpers import FamilyModule, quiet_trainer

    from lightning_peft import ID3, LoRA

    save_dir = tmp_path / "adapter"
    cb = (
        LoRA(r=2, save_dir=str(save_dir)) if method == "lora" else ID3(budget=20, total_steps=2, save_dir=str(save_dir))
    )
    module = FamilyModule("llama", n_batches=2)
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[cb]).fit(module)
    assert (save_dir / "lightning_peft.json").is_file()
    before = {p.name: p.read_bytes() for p in save_dir.iterdir()}
    push = ["push", str(save_dir), "from-save-dir", "--root", str(local.root), "--base-model", "org/tiny-llama"]
    assert zoo_cli(push) == 0
    (entry,) = local.list()
    assert entry.name == "from-save-dir" and entry.method == method and entry.base_model == "org/tiny-llama"
    assert [e.name for e in zoo.search(base_model="tiny", method=method.upper(), zoo=local)] == ["from-save-dir"]
    card = (zoo.download("from-save-dir", zoo=local) / "README.md").read_text()  # a card, made from the manifest
    assert "# from-save-dir" in card and "base_model: org/tiny-llama" in card and f"- {method}" in card
    assert ("--format peft-shira" in card) == (method == "id3")  # a sparse result exports for peft's SHiRA
    assert ("the entry is a peft adapter as it is" in card) == (method == "lora")
    assert {p.name: p.read_bytes() for p in save_dir.iterdir()} == before  # the save_dir itself is left as it was
    zoo.load(FamilyModule("llama", n_batches=2).model, "from-save-dir", zoo=local)  # the base fingerprint matches


def test_the_card_of_a_unet_lora_names_the_diffusers_pipeline_loader(tmp_path) -> None:
    from lightning_peft.zoo.card import loaders

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert "--format diffusers-lora`, then `pipe.load_lora_weights(DIR)`" in loaders(
        tmp_path, "x", "UNet2DConditionModel"
    )
    assert "diffusers-lora" not in loaders(tmp_path, "x", "LlamaForCausalLM")
