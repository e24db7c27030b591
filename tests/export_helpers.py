"""Helpers of the export tests: build each method's saved result without training, and read exports back in a
subprocess in which ``import lightning_peft`` fails (so only the family's own loader can have read them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, inject_adapters
from lightning_peft.adapters.delta import delta_config, write_delta
from lightning_peft.adapters.sparse import inject_sparse, sparse_bank, sparse_layers
from lightning_peft.zoo import build_entry, fingerprint

METHODS = ("lora", "adalora", "lisa", "id3", "sara", "hft", "spiel")

_BLOCKER = """
import sys
class _NoLightningPeft:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning_peft" or name.startswith("lightning_peft."):
            raise ImportError("lightning_peft is blocked in this process")
        return None
sys.meta_path.insert(0, _NoLightningPeft())
try:
    import lightning_peft
except ImportError:
    pass
else:
    raise SystemExit("the import blocker did not work")
"""

_LOADERS = {
    "transformers": "import transformers; model = getattr(transformers, json.load(open(f'{d}/config.json'))"
    "['architectures'][0]).from_pretrained(d)",
    "diffusers": "import diffusers; model = getattr(diffusers, json.load(open(f'{d}/config.json'))['_class_name'])"
    ".from_pretrained(d)",
    "timm": "import timm; model = timm.create_model('local-dir:' + d, pretrained=True)",
    # a peft adapter in d, onto the transformers base model saved beside it in d + "-base"
    "peft": "import peft, transformers; model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM"
    ".from_pretrained(d + '-base'), d)",
}


def read_back(jobs: list[tuple[str, Path, dict[str, torch.Tensor]]], tmp: Path) -> list[torch.Tensor]:
    """Load each ``(library, folder, inputs)`` export with its library's loader in one subprocess (no
    lightning_peft importable there) and return its outputs for ``model(**inputs)`` in eval mode."""
    specs = []
    for i, (library, folder, inputs) in enumerate(jobs):
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp / f"in{i}.safetensors"))
        specs.append([library, str(folder), str(tmp / f"in{i}.safetensors"), str(tmp / f"out{i}.safetensors")])
    loaders = "\n".join(
        f"    {'if' if i == 0 else 'elif'} lib == {k!r}:\n        {v}" for i, (k, v) in enumerate(_LOADERS.items())
    )
    script = _BLOCKER + textwrap.dedent(
        """
        import json, torch
        from safetensors.torch import load_file, save_file
        for lib, d, src, dst in json.loads(sys.argv[1]):
        {loaders}
            with torch.no_grad():
                out = model.eval()(**load_file(src))
            if not isinstance(out, torch.Tensor):
                out = out.logits if hasattr(out, "logits") else out.sample
            save_file({{"out": out.contiguous()}}, dst)
        """
    ).format(loaders=loaders)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(specs)], capture_output=True, text=True, env=env, cwd=tmp
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [load_file(dst)["out"] for *_, dst in specs]


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in _LINEARS]


_LINEARS = ("q_proj", "v_proj", "to_q", "to_v", "qkv", "fc1", "query", "value")


def make_result(method: str, model: nn.Module, folder: Path, name: str = "result") -> nn.Module:
    """Give ``model`` a non-trivial ``method`` result (no training) and write it as a zoo entry into ``folder``.

    Returns the model in its trained state (adapters still injected), whose outputs the export must match.
    """
    torch.manual_seed(1)
    targets = _targets(model)
    if method in ("lora", "adalora"):
        if method == "lora":
            config: LoRAConfig = LoRAConfig(r=4, alpha=8, target_modules=targets, init="nonzero")
        else:
            config = AdaLoRAConfig(r=4, target_r=2, alpha=8, total_step=10, target_modules=targets, init="nonzero")
        inject_adapters(model, config)
        if method == "adalora":  # a pruned rank pattern, as the allocator leaves it
            from lightning_peft.adapters import adapter_layers

            first = next(layer for _, layer in adapter_layers(model))
            first.shrink(torch.tensor([True, False, True, False]))
            with torch.no_grad():
                for _, layer in adapter_layers(model):
                    layer.lora_E.normal_()
        build_entry(folder, model, config, name)
        return model
    base = fingerprint(model)
    if method == "lisa":  # a dense delta: the new values of two blocks' tensors
        changed = {}
        for pname, param in model.named_parameters():
            if pname.startswith(targets[0].rsplit(".", 1)[0]) or pname in (f"{targets[-1]}.weight",):
                with torch.no_grad():
                    param.add_(0.1 * torch.randn_like(param))
                changed[pname] = param.detach().clone()
        write_delta(folder, changed, delta_config("lisa", "dense", list(changed)))
    elif method == "hft":  # a dense delta: the new values of every other target (half of each block's groups)
        half = {f"{t}.weight" for t in targets[::2]}
        changed = {}
        for pname, param in model.named_parameters():
            if pname in half:
                with torch.no_grad():
                    param.add_(0.1 * torch.randn_like(param))
                changed[pname] = param.detach().clone()
        write_delta(folder, changed, delta_config("hft", "dense", list(changed)))
    else:  # a sparse delta from the method's own callback's save
        from lightning_peft import ID3, SaRA, SpIEL

        inject_sparse(model, {t: ("weight",) for t in targets}, capacity=8 * len(targets))
        for _, layer in sparse_layers(model):
            n = layer.base_layer.weight.numel()
            layer.add("weight", torch.randperm(n)[:8].sort().values)
        bank = sparse_bank(model)
        assert bank is not None
        with torch.no_grad():
            bank.values.normal_(std=0.1)
        callback = {"id3": ID3(budget=8 * len(targets)), "sara": SaRA(), "spiel": SpIEL(budget=8 * len(targets))}
        callback[method].save(model, folder)
    build_entry(folder, model, None, name, adapter_written=True, method=method, base_fingerprint=base)
    return model
