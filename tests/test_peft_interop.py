"""Our LoRA files are peft's format: peft loads ours and we load peft's, with the same outputs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, forward

from lightning_peft.adapters import LoRAConfig, adapter_layers, inject_adapters, load_adapter, save_adapter
from lightning_peft.backbones import default_target_modules

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_loads_our_adapter(name: str, tmp_path) -> None:
    model = FAMILIES[name](seed=0)
    config = LoRAConfig(r=4, alpha=8, target_modules=list(default_target_modules(model)), init="nonzero")
    torch.manual_seed(1)
    inject_adapters(model, config)
    ours = forward(name, model.eval())
    save_adapter(model, tmp_path, config)
    loaded = peft.PeftModel.from_pretrained(FAMILIES[name](seed=0), tmp_path).eval()
    n_peft = sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A"))
    assert n_peft == len(list(adapter_layers(model)))
    torch.testing.assert_close(forward(name, loaded), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_we_load_a_peft_adapter(name: str, tmp_path) -> None:
    base = FAMILIES[name](seed=0)
    targets = list(default_target_modules(base))
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    reference = forward(name, peft_model.eval())
    peft_model.save_pretrained(tmp_path)
    ours = FAMILIES[name](seed=0)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(forward(name, ours.eval()), reference, atol=1e-5, rtol=1e-5)
