"""HubZoo with the real huggingface_hub client against the Hub-protocol test server on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
from hub_server import point_client_at, running_hub
from lit_helpers import FamilyModule, quiet_trainer
from tiny_models import FAMILIES, forward

from lightning_peft import LoRA, ZooPublisher, zoo
from lightning_peft.adapters import LoRAConfig, adapter_layers, inject_adapters
from lightning_peft.zoo import EntryError, HubError, HubZoo
from lightning_peft.zoo.cli import main as zoo_cli


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub-protocol server on 127.0.0.1; the client's endpoint, caches and token path all point into tmp_path."""
    with running_hub(tmp_path / "server") as server:
        point_client_at(server, monkeypatch, tmp_path / "hf_home", implicit_token=True)  # HF_TOKEN is the login
        yield server
        assert not server.errors, server.errors


def hub_zoo(server, tmp_path, token: str | None = None) -> HubZoo:
    return HubZoo(namespace=server.user, endpoint=server.url, token=token or server.token, cache_dir=tmp_path / "cache")


def trained(seed: int = 0) -> tuple[torch.nn.Module, LoRAConfig]:
    model = FAMILIES["llama"](seed=0).eval()
    config = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init="nonzero")
    torch.manual_seed(seed + 11)
    inject_adapters(model, config)
    return model, config


def test_publish_search_download_load_and_revisions(hub, tmp_path, monkeypatch) -> None:
    remote = hub_zoo(hub, tmp_path)
    model, config = trained()
    out = forward("llama", model)
    first = zoo.publish(model, "llama-qv", config, zoo=remote, base_model="tiny/llama", metrics={"val_loss": 0.25})
    assert len(first) == 40
    (row,) = remote.search("llama", method="lora")
    assert row.name == f"{hub.user}/llama-qv" and row.revision == first and "lightning-peft" in row.tags
    assert remote.search("nothing-like-this") == [] and remote.search(method="adalora") == []
    # the same matching as the local zoo: the method in any case, a base-model substring, the query over all fields
    for hit in (remote.search(method="LoRA"), remote.search(base_model="TINY"), remote.search("tiny/ll")):
        assert [r.name for r in hit] == [f"{hub.user}/llama-qv"]
    assert [r.name for r in remote.list()] == [f"{hub.user}/llama-qv"]
    fresh = FAMILIES["llama"](seed=0).eval()
    zoo.load(fresh, "llama-qv", zoo=remote)
    torch.testing.assert_close(forward("llama", fresh), out)
    folder = remote.download("llama-qv")
    assert all(hub.token.encode() not in p.read_bytes() for p in folder.iterdir())  # the token is never written
    assert hub.token not in repr(remote)

    with torch.no_grad():  # a second publish is a new revision; the first stays reachable
        for _, layer in adapter_layers(model):
            layer.lora_B.mul_(2.0)
    second = zoo.publish(model, "llama-qv", config, zoo=remote)
    assert second != first
    old = FAMILIES["llama"](seed=0).eval()
    zoo.load(old, "llama-qv", revision=first, zoo=remote)
    torch.testing.assert_close(forward("llama", old), out)
    new = FAMILIES["llama"](seed=0).eval()
    zoo.load(new, "llama-qv", zoo=remote)
    torch.testing.assert_close(forward("llama", new), forward("llama", model))

    # offline: the cached revision still loads
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cached = FAMILIES["llama"](seed=0).eval()
    zoo.load(cached, "llama-qv", revision=first, zoo=remote)
    torch.testing.assert_close(forward("llama", cached), out)


def test_hub_errors_each_say_what_happened(hub, tmp_path) -> None:
    remote = hub_zoo(hub, tmp_path)
    model, config = trained()
    zoo.publish(model, "e", config, zoo=remote)
    with pytest.raises(HubError, match="not found"):
        remote.download("missing-repo")
    with pytest.raises(HubError, match="revision"):
        remote.download("e", revision="0" * 40)
    intruder = hub_zoo(hub, tmp_path, token="hf_wrong")
    with pytest.raises(HubError, match="permission|not found"):
        zoo.publish(model, "e2", config, zoo=intruder)
    url = hub.url
    hub.stop()
    gone = HubZoo(namespace=hub.user, endpoint=url, token=hub.token, cache_dir=tmp_path / "empty-cache")
    with pytest.raises(HubError, match="cannot be reached|not in the local cache"):
        gone.download("e")


def test_tampered_remote_file_is_rejected_and_not_cached(hub, tmp_path) -> None:
    remote = hub_zoo(hub, tmp_path)
    model, config = trained()
    zoo.publish(model, "t", config, zoo=remote)
    path = remote.download("t")
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()  # the cache holds symlinks into blobs: replace the file, not the blob
    weights.write_bytes(bytes(data))
    with pytest.raises(EntryError, match="sha256"):
        remote.download("t")
    assert not path.exists()  # the bad snapshot left the cache


def test_zoo_publisher_to_the_hub_and_the_cli(hub, tmp_path, monkeypatch, capsys) -> None:
    module = FamilyModule("vit", n_batches=2)
    publisher = ZooPublisher(name="vit-lora", zoo="hub", namespace=hub.user, endpoint=hub.url, base_model="tiny-vit")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    lora = LoRA(r=2, save_dir=str(tmp_path / "adapter"))
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[lora, publisher]).fit(module)
    assert publisher.revision and len(publisher.revision) == 40
    monkeypatch.setenv("COLUMNS", "200")
    args = ["--hub", "--namespace", hub.user, "--endpoint", hub.url]
    assert zoo_cli(["list", *args]) == 0
    assert f"{hub.user}/vit-lora" in capsys.readouterr().out
    # a callback's save_dir, pushed as it is: it gets a model card, so the Hub lists and finds it by its tags
    assert zoo_cli(["push", str(tmp_path / "adapter"), "vit-save-dir", "--base-model", "org/tiny-vit", *args]) == 0
    assert zoo_cli(["search", "--method", "LoRA", "--base-model", "TINY", *args]) == 0
    assert f"{hub.user}/vit-save-dir" in capsys.readouterr().out
    assert zoo_cli(["rm", "vit-save-dir", "--yes", *args]) == 0
    assert zoo_cli(["rm", "vit-lora", "--yes", *args]) == 0
    assert zoo_cli(["list", *args]) == 0 and "no entries" in capsys.readouterr().out
