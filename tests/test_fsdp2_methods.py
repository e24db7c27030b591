"""LoRA, AdaLoRA and SSF under 2-process FSDP2 (``lightning_peft.shard``) against one unsharded process.

Each method runs four times (``tests/scripts/fsdp2_fit.py``): sharded, as the one-process reference on the union of
both ranks' batches, and sharded again with a distributed checkpoint after the first epoch, a SIGKILL of every rank,
and a resume. AdaLoRA's schedule masks at steps 1..5 of 8 and the adapters are shrunk at the end, so the scores, the
masks, the shrink and the saved ``rank_pattern`` all cross the sharded path. SSF runs on the tiny timm ViT (the
Llama's linears have no bias to merge a shift into), with the reference's random init (each rank its own, so the
broadcast of rank 0's is checked) and the head trained in full; the ViT's ``cls_token`` / ``pos_embed`` (dim 0 of
size 1, sharded unevenly) go through the base fingerprint. LISA, ID3 and SaRA have files of their own
(``test_fsdp2_lisa.py``, ``test_fsdp2_sparse.py``) on the same harness.
"""

from __future__ import annotations

import pytest
from fsdp2_checks import (
    check_matches_single,
    check_result_reproduces_outputs,
    check_resume,
    check_sharded,
    fsdp2_unavailable,
    run,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))]

SPECS = {
    "lora": {"class": "LoRA", "init_args": {"r": 4, "alpha": 8, "init": "nonzero"}},
    "adalora": {
        "class": "AdaLoRA",
        "init_args": {"r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8},
    },
    "ssf": {"class": "SSF", "family": "vit", "init_args": {"init": "normal", "modules_to_save": ["head"]}},
}
ADAPTER = {"lora": ".lora_", "adalora": ".lora_", "ssf": ".ssf_"}  # the adapter tensors' names


@pytest.fixture(scope="module", params=sorted(SPECS))
def runs(request, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(request.param)
    spec = SPECS[request.param]
    return {
        "name": request.param,
        "tmp": tmp,
        "spec": spec,
        "fsdp2": run(tmp / "fsdp2", "fsdp2", spec),
        "single": run(tmp / "single", "single", spec),
    }


def test_base_is_sharded_and_ranks_end_identical(runs) -> None:
    check_sharded(runs["fsdp2"])
    dtensor = runs["fsdp2"]["info"][0]["dtensor"]
    adapters = {k: v for k, v in dtensor.items() if ADAPTER[runs["name"]] in k}
    if runs["name"] == "adalora":  # kept whole for whole-triplet scores; LoRA's are sharded like the base
        assert adapters and not any(adapters.values())
    else:  # LoRA's factors and SSF's scales/shifts are sharded with their block
        assert adapters and all(adapters.values())
    assert all(v for k, v in dtensor.items() if k.endswith("base_layer.weight"))


def test_equals_one_unsharded_process(runs) -> None:
    diff = check_matches_single(runs["fsdp2"], runs["single"])
    print(f"{runs['name']}: FSDP2 vs one process, max |diff| = {diff:.3g}")
    if runs["name"] == "adalora":
        state = runs["fsdp2"]["info"][0]["state"]["allocator"]
        assert state["history"] and state["rank_pattern"] is not None  # masks happened, the pattern froze


def test_saved_result_reproduces_the_sharded_outputs_unsharded(runs) -> None:
    check_result_reproduces_outputs(runs["fsdp2"])


def test_resume_from_a_sharded_checkpoint_after_sigkill_is_exact(runs) -> None:
    diff = check_resume(runs["tmp"], runs["spec"], runs["fsdp2"])
    print(f"{runs['name']}: resumed vs uninterrupted, max |diff| = {diff:.3g}")
