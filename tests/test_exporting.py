"""Export: every method's result merged into its base and written in the family's own format, read back by the
family's loader in a process that cannot import lightning_peft, with the lightning-peft model's outputs."""

from __future__ import annotations

import pytest
import torch
from export_helpers import METHODS, make_result, read_back
from tiny_models import example_inputs, forward, tiny_ast, tiny_dit, tiny_llama, tiny_mlp, tiny_unet

import lightning_peft
from lightning_peft.zoo import FingerprintMismatchError


def _tiny_timm_vit(seed: int = 0) -> torch.nn.Module:
    """The tiny ViT of tiny_models, made by timm.create_model (so it has the pretrained_cfg timm rebuilds from)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            "vit_tiny_patch16_224",
            img_size=8,
            patch_size=2,
            in_chans=1,
            num_classes=10,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
        )


def test_every_method_exports_to_transformers(tmp_path) -> None:
    jobs, expected = [], []
    for method in METHODS:
        trained = make_result(method, tiny_llama(seed=0), tmp_path / method).eval()
        with torch.no_grad():
            expected.append(forward("llama", trained))
        out = lightning_peft.export(tmp_path / method, tmp_path / f"{method}-merged", base=tiny_llama(seed=0))
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        jobs.append(("transformers", out, example_inputs("llama", trained)))
    for method, got, want in zip(METHODS, read_back(jobs, tmp_path), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, method=method: f"{method}: {m}")


@pytest.mark.parametrize(
    ("family", "factory", "library"),
    [
        ("vit", _tiny_timm_vit, "timm"),
        ("unet", tiny_unet, "diffusers"),
        ("dit", tiny_dit, "diffusers"),
        ("ast", tiny_ast, "transformers"),  # an audio transformer
    ],
)
def test_every_method_exports_to_each_familys_own_format(tmp_path, family, factory, library) -> None:
    jobs, expected = [], []
    for i, method in enumerate(METHODS):
        trained = make_result(method, factory(seed=0), tmp_path / method).eval()
        with torch.no_grad():
            expected.append(forward(family, trained))
        if i % 2:  # from the saved result and the base, or from the trained model itself
            out = lightning_peft.export(tmp_path / method, tmp_path / f"{method}-merged", base=factory(seed=0))
        else:
            out = lightning_peft.export(trained, tmp_path / f"{method}-merged")
        jobs.append((library, out, example_inputs(family, trained)))
    for method, got, want in zip(METHODS, read_back(jobs, tmp_path), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, method=method: f"{method}: {m}")


def test_a_plain_module_exports_its_state_dict(tmp_path) -> None:
    from safetensors.torch import load_model

    trained = make_result("sara", tiny_mlp(seed=0), tmp_path / "entry").eval()
    out = lightning_peft.export(tmp_path / "entry", tmp_path / "merged", base=tiny_mlp(seed=0))
    fresh = tiny_mlp(seed=3).eval()
    load_model(fresh, str(out / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(forward("mlp", fresh), forward("mlp", trained), atol=1e-5, rtol=1e-5)


def test_another_base_is_refused_before_anything_is_written(tmp_path) -> None:
    make_result("lora", tiny_llama(seed=0), tmp_path / "entry")
    with pytest.raises(FingerprintMismatchError, match="not the base model"):
        lightning_peft.export(tmp_path / "entry", tmp_path / "out", base=tiny_llama(seed=1))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no staging folder left behind


def test_export_refuses_what_it_cannot_write(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        lightning_peft.export(tiny_mlp(), tmp_path / "full")
    with pytest.raises(ValueError, match="not made by timm.create_model"):
        lightning_peft.export(
            VisionTransformer(img_size=8, patch_size=2, embed_dim=8, depth=1, num_heads=1), tmp_path / "vit"
        )
    with pytest.raises(ValueError, match="needs base="):
        lightning_peft.export(tmp_path / "full", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def _cli(monkeypatch, *argv: object) -> int:
    """Run the ``lightning-peft`` console script with ``argv``; its exit code."""
    from lightning_peft.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-peft", *map(str, argv)])
    with pytest.raises(SystemExit) as code:
        main()
    return int(code.value.code or 0)


def test_cli_export_from_a_folder_and_from_the_zoo(tmp_path, monkeypatch, capsys) -> None:
    from transformers import LlamaForCausalLM

    from lightning_peft.zoo import LocalZoo

    trained = make_result("adalora", tiny_llama(seed=0), tmp_path / "entry").eval()
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    base = ("--base", tmp_path / "base")
    assert _cli(monkeypatch, "export", tmp_path / "entry", *base, "--out", tmp_path / "a") == 0, capsys.readouterr()
    LocalZoo(tmp_path / "zoo").publish(tmp_path / "entry", "tiny-adalora")
    zoo = ("--root", tmp_path / "zoo")
    assert _cli(monkeypatch, "zoo", "export", "tiny-adalora", *zoo, *base, "--out", tmp_path / "b") == 0
    with torch.no_grad():
        want = forward("llama", trained)
        for out in ("a", "b"):
            got = forward("llama", LlamaForCausalLM.from_pretrained(tmp_path / out).eval())
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert _cli(monkeypatch, "export", tmp_path / "entry", "--base", tmp_path / "a", "--out", tmp_path / "c") == 2
    assert "not the base model" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------- ID3 / SaRA as peft SHiRA
def _sparse_result(folder, method: str = "id3"):
    """A tiny Llama with a sparse result the SHiRA export must split three ways, written as a zoo entry: Linear
    weights with a few entries (SHiRA layers), one Linear so dense that no shared r fits it and a norm weight
    (modules to save, whole), and ``lm_head`` trained in full (the callback's ``modules_to_save``)."""
    from lightning_peft import ID3, SaRA, SpIEL
    from lightning_peft.adapters.sparse import inject_sparse, sparse_bank, sparse_layers
    from lightning_peft.zoo import build_entry, fingerprint

    model = tiny_llama(seed=0)
    base = fingerprint(model, exclude=["lm_head"])
    model.requires_grad_(False)
    chosen = {
        "model.layers.0.self_attn.q_proj": 8,  # 32 x 32
        "model.layers.1.mlp.down_proj": 20,  # 64 in, 32 out
        "model.layers.1.self_attn.k_proj": 500,  # 32 in, 16 out: 500 > r (32 + 16) <= 512 holds for no r
        "model.layers.0.input_layernorm": 3,
    }
    bank = inject_sparse(model, {name: ("weight",) for name in chosen}, capacity=sum(chosen.values()))
    gen = torch.Generator().manual_seed(5)
    for name, layer in sparse_layers(model):
        n = layer.base_layer.weight.numel()
        layer.add("weight", torch.randperm(n, generator=gen)[: chosen[name]].sort().values)
    assert bank is sparse_bank(model)
    with torch.no_grad():
        bank.values.copy_(0.1 * torch.randn(bank.values.shape, generator=gen))
        model.lm_head.weight.add_(0.1 * torch.randn(model.lm_head.weight.shape, generator=gen))
    model.lm_head.requires_grad_(True)
    callback = {
        "id3": ID3(budget=bank.capacity, modules_to_save=["lm_head"]),
        "sara": SaRA(modules_to_save=["lm_head"]),
        "spiel": SpIEL(budget=bank.capacity, modules_to_save=["lm_head"]),
    }[method]
    callback.save(model, folder)
    build_entry(folder, model, None, "sparse", adapter_written=True, method=method, base_fingerprint=base)
    return model.eval()


@pytest.mark.parametrize("method", ["id3", "sara", "spiel"])
def test_sparse_results_load_into_peft_as_shira_with_the_same_outputs(tmp_path, method, monkeypatch) -> None:
    import json

    trained = _sparse_result(tmp_path / "entry", method)
    with torch.no_grad():
        want = forward("llama", trained)
    tiny_llama(seed=0).save_pretrained(tmp_path / "from-entry-base")
    tiny_llama(seed=0).save_pretrained(tmp_path / "from-model-base")
    from_entry = tmp_path / "from-entry"  # by the command line, from the base model's own folder
    argv = ("export", tmp_path / "entry", "--base", f"{from_entry}-base", "--out", from_entry, "--format", "peft-shira")
    assert _cli(monkeypatch, *argv) == 0
    from_model = lightning_peft.export(trained, tmp_path / "from-model", format="peft-shira")
    for out in (from_entry, from_model):
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["mask_type"]) == ("SHIRA", 1, "saved_indices")
        assert config["modules_to_save"] == [
            "lm_head",
            "model.layers.0.input_layernorm",
            "model.layers.1.self_attn.k_proj",
        ]
        assert config["target_modules"] == r"(?:model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj)"
    inputs = example_inputs("llama", trained)
    for got in read_back([("peft", from_entry, inputs), ("peft", from_model, inputs)], tmp_path):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shira_export_refuses_what_peft_cannot_hold(tmp_path) -> None:
    from lightning_peft.adapters.sparse import inject_sparse, sparse_layers

    for method in ("lora", "lisa"):
        make_result(method, tiny_llama(seed=0), tmp_path / method)
        with pytest.raises(ValueError, match="writes sparse results .* export merged"):
            lightning_peft.export(tmp_path / method, tmp_path / "out", base=tiny_llama(0), format="peft-shira")

    class Rooted(torch.nn.Module):  # a parameter of the model itself, as a ViT's cls_token
        def __init__(self) -> None:
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(4))
            self.proj = torch.nn.Linear(4, 4)

    rooted = Rooted().requires_grad_(False)
    inject_sparse(rooted, {"proj": ("weight",)}, capacity=2)
    next(layer for _, layer in sparse_layers(rooted)).add("weight", torch.tensor([1]))
    rooted.token.requires_grad_(True)  # trained in full beside the sparse layers
    with pytest.raises(ValueError, match="parameter of the model itself"):
        lightning_peft.export(rooted, tmp_path / "out", format="peft-shira")
    norm_only = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).requires_grad_(False)
    inject_sparse(norm_only, {"1": ("weight",)}, capacity=2)
    next(layer for _, layer in sparse_layers(norm_only)).add("weight", torch.tensor([1]))
    with pytest.raises(ValueError, match="no tensor of this result is the weight of an nn.Linear"):
        lightning_peft.export(norm_only, tmp_path / "out", format="peft-shira")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lisa", "lora"]  # nothing written, no staging left
