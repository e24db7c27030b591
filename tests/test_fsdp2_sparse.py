"""ID3, SaRA and SpIEL under 2-process FSDP2 (``ModelParallelStrategy`` + ``lightning_peft.shard``, gloo, CPU).

The sparse bank is kept whole on every rank and its gradient averaged; each rank writes the learned values into
its own shards. Each spec's events happen during the 8-step run: ID3 unmasks its budget over 4 steps (a new
choice at every one of them, scored on gradients all-reduced across ranks); SaRA selects, is penalised every
step and re-selects at step 4 (entries retire, others join); SpIEL draws at random, then drops and regrows at steps
1, 4 and 7 from gradients averaged across ranks. ``lm_head`` is a target too: it sits in FSDP2's root
group, which stays unsharded between forward and backward, unlike the blocks.

The decisions (selected indices, bank slots, retired deltas) are the sparse layers' buffers; the harness records
them as ``buffer.<name>`` and they must equal the one-process run's exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import fsdp2_checks as checks  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(checks.fsdp2_unavailable() is not None, reason=str(checks.fsdp2_unavailable())),
]

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
SPECS = {
    "ID3": {"class": "ID3", "init_args": {"budget": 200, "total_steps": 4, "target_modules": TARGETS}},
    "SaRA": {
        "class": "SaRA",
        "init_args": {"fraction": 0.1, "reselect_at": 4, "rank_penalty": 0.1, "target_modules": TARGETS},
    },
    "SpIEL": {
        "class": "SpIEL",
        "init_args": {
            "budget": 200,
            "reselection_steps": 3,
            "accumulation_steps": 1,
            "drop_fraction": 0.5,
            "target_modules": TARGETS,
        },
    },
}


def buffers(result: dict, rank: int = 0) -> dict[str, torch.Tensor]:
    return {k: v for k, v in result["tensors"][rank].items() if k.startswith("buffer.")}


def check_same_decisions(a: dict, b: dict) -> None:
    """The sparse layers' buffers are equal: indices and slots exactly, base and frozen values within ATOL."""
    ours, theirs = buffers(a), buffers(b)
    assert ours and ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
    for key, tensor in ours.items():
        assert tensor.shape == theirs[key].shape, f"{key}: {tuple(tensor.shape)} vs {tuple(theirs[key].shape)}"
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=checks.ATOL, msg=key)
        else:
            assert torch.equal(tensor, theirs[key]), key


@pytest.fixture(scope="module", params=sorted(SPECS))
def runs(request, tmp_path_factory) -> dict:
    name = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp2_{name.lower()}")
    return {
        "name": name,
        "tmp": tmp,
        "fsdp2": checks.run(tmp / "fsdp2", "fsdp2", SPECS[name]),
        "single": checks.run(tmp / "single", "single", SPECS[name]),
    }


def test_events_happened(runs) -> None:
    result = runs["fsdp2"]
    state = result["info"][0]["state"]
    sizes = {k: v.numel() for k, v in buffers(result).items()}
    slots = {k: v for k, v in buffers(result).items() if k.endswith("_weight_slots")}  # -1: retired
    active = sum(int((v >= 0).sum()) for v in slots.values())
    selected = sum(n for k, n in sizes.items() if k.endswith("_weight_indices") and "_active_" not in k)
    if runs["name"] == "ID3":
        assert state["unmasker"]["next_step"] == 4 and state["unmasker"]["unmasked"] == 200
        assert active == selected == 200
    elif runs["name"] == "SpIEL":
        assert state["updates"] == 3  # at completed steps 1, 4 and 7 of 8
        assert 0 < active <= 200
        assert state["moved"] and all(n > 0 for _, n in state["moved"]), "no entry moved"
        assert selected == active, "dropped entries were not forgotten"
    else:
        assert state["reselect_step"] == 4
        assert selected > active > 0, "the re-selection retired no entry"


def test_sharded_equals_one_process(runs) -> None:
    checks.check_sharded(runs["fsdp2"])
    diff = checks.check_matches_single(runs["fsdp2"], runs["single"])
    check_same_decisions(runs["fsdp2"], runs["single"])
    print(f"{runs['name']}: FSDP2 vs one process, max |diff| {diff:.3g}")


def test_result_loads_onto_an_unsharded_model(runs) -> None:
    checks.check_result_reproduces_outputs(runs["fsdp2"])


def test_resume_from_a_distributed_checkpoint(runs) -> None:
    diff = checks.check_resume(runs["tmp"], SPECS[runs["name"]], runs["fsdp2"])
    resumed = {"tensors": [load_file(runs["tmp"] / "resumed" / "rank0.safetensors")]}
    check_same_decisions(resumed, runs["fsdp2"])
    print(f"{runs['name']}: resumed vs uninterrupted, max |diff| {diff:.3g}")
