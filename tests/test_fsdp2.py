"""Two CPU processes under FSDP2 (Lightning's ``ModelParallelStrategy`` + ``fully_shard``, gloo) with ``LoRA``.

Unlike DDP, FSDP2 does not broadcast rank 0's weights (the LoRA callback does, in ``setup``), and
every later read goes through an all-gather. So "the ranks gathered the same
tensors" holds by construction and proves nothing about gradient synchronisation. The proof here is
a replay: one unsharded process starts from the gathered initial adapter, takes the mean of both
ranks' losses at each step, and must land on the adapter FSDP2 trained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp2_checks import fsdp2_unavailable
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the script's constants

PREFIX = "base_model.model."


pytestmark = [pytest.mark.slow, pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Run ``scripts/fsdp2_lora.py`` once; the per-rank tensors and logs."""
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp2_lora.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SCRIPTS.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {
        "out": out,
        "tensors": [load_file(out / f"rank{r}.safetensors") for r in (0, 1)],
        "logs": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)],
    }


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}


def test_lora_params_are_sharded_dtensors(run) -> None:
    for log in run["logs"]:
        assert log["backend"] == "gloo" and log["world_size"] == 2 and log["step"] == 4
        assert len(log["dtensor"]) == 28 and all(log["dtensor"].values()), "LoRA params were not sharded by FSDP2"
        assert log["trainable"] and all(".lora_" in k for k in log["trainable"])
    full = _section(run["tensors"][0], "final")
    for name, shape in run["logs"][0]["local_shapes"].items():
        assert shape[0] * 2 == full[name].shape[0] and shape[1:] == list(full[name].shape[1:]), name
    seeds = run["logs"][0]["seeds"]
    assert seeds == run["logs"][1]["seeds"]
    assert sorted(s for rank in seeds for step in rank for s in step) == list(range(8)), "ranks did not split the data"


def test_every_rank_starts_from_rank_zeros_init(run) -> None:
    """Ranks are seeded differently; LoRA.setup broadcasts rank 0's adapter init, so the start is the same everywhere
    (FSDP2, unlike DDP, would otherwise keep each rank's own rows of its own init)."""
    local = [_section(t, "local_init") for t in run["tensors"]]
    init = _section(run["tensors"][0], "init")
    for key, value in init.items():
        torch.testing.assert_close(local[0][key], local[1][key], rtol=0, atol=0)
        torch.testing.assert_close(value, local[0][key], rtol=0, atol=0)


def test_gathered_adapter_identical_on_ranks_and_trained(run) -> None:
    ranks = run["tensors"]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        if not key.startswith("local_init."):
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    init, final = _section(ranks[0], "init"), _section(ranks[0], "final")
    assert init.keys() == final.keys() and len(final) == 28
    for key in final:
        assert not torch.allclose(init[key], final[key]), f"{key} did not train"


def test_replay_unsharded_matches_fsdp2_training(run) -> None:
    """One process, same start, mean of both ranks' losses per step: the FSDP2-trained adapter."""
    from fsdp2_lora import FAMILY, LR
    from tiny_models import FAMILIES, forward

    from lightning_peft.adapters import load_adapter, mark_trainable

    init, final = _section(run["tensors"][0], "init"), _section(run["tensors"][0], "final")
    model = FAMILIES[FAMILY](seed=0)
    load_adapter(model, run["out"] / "adapter")  # injects the same layers
    mark_trainable(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in init.items():
            params[key].copy_(value)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    seeds = run["logs"][0]["seeds"]  # [rank][step][batch]
    for step in range(len(seeds[0])):
        losses = []
        for rank_seeds in seeds:
            out = torch.cat([forward(FAMILY, model, batch=2, seed=s) for s in rank_seeds[step]])
            losses.append(out.float().pow(2).mean())
        opt.zero_grad()
        torch.stack(losses).mean().backward()
        opt.step()
    for key, value in final.items():
        torch.testing.assert_close(params[key].detach(), value, rtol=1e-4, atol=1e-5, msg=key)


def test_saved_adapter_and_zoo_entry(run) -> None:
    from lightning_peft.zoo import LocalZoo

    final = _section(run["tensors"][0], "final")
    saved = load_file(run["out"] / "adapter" / "adapter_model.safetensors")
    assert set(saved) == {f"{PREFIX}{k}.weight" for k in final}  # peft names: base_model.model.<layer>.lora_A.weight
    for key, value in final.items():
        torch.testing.assert_close(saved[f"{PREFIX}{key}.weight"], value, rtol=0, atol=0)
    zoo = LocalZoo(run["out"] / "zoo")
    assert len(zoo.revisions("fsdp2")) == 1
    published = load_file(zoo.download("fsdp2") / "adapter_model.safetensors")
    assert published.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(published[key], value, rtol=0, atol=0)


def test_load_adapter_on_unsharded_model_reproduces_sharded_outputs(run) -> None:
    from fsdp2_lora import FAMILY, LOGIT_SEED
    from tiny_models import FAMILIES, forward

    from lightning_peft.adapters import load_adapter
    from lightning_peft.zoo import LocalZoo, load

    logits = run["tensors"][0]["logits"]
    plain = forward(FAMILY, FAMILIES[FAMILY](seed=0), batch=2, seed=LOGIT_SEED).detach()
    assert not torch.allclose(plain, logits, atol=1e-4), "the adapter does not change the output"
    model = FAMILIES[FAMILY](seed=0)
    load_adapter(model, run["out"] / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(forward(FAMILY, model, batch=2, seed=LOGIT_SEED), logits, rtol=1e-5, atol=1e-5)
    # zoo.load checks the base fingerprint the publisher computed from the sharded (DTensor) weights
    model = FAMILIES[FAMILY](seed=0)
    load(model, "fsdp2", zoo=LocalZoo(run["out"] / "zoo"))
    with torch.no_grad():
        torch.testing.assert_close(forward(FAMILY, model, batch=2, seed=LOGIT_SEED), logits, rtol=1e-5, atol=1e-5)


def test_manifest_records_the_unwrapped_base_class(run) -> None:
    from lightning_peft.zoo import LocalZoo
    from lightning_peft.zoo.entry import read_manifest

    manifest = read_manifest(LocalZoo(run["out"] / "zoo").download("fsdp2"))
    assert manifest["base_model"]["class"] == "LlamaForCausalLM"
