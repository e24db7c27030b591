"""LISA under 2-process FSDP2 (``ModelParallelStrategy`` + ``lightning_peft.shard``, gloo): the same run as one process.

The runs come from the shared harness (``scripts/fsdp2_fit.py``, checks in ``fsdp2_checks.py``): 8 optimizer steps
(2 epochs x 4) with block switches, against one unsharded process on the union of both ranks' batches; the saved
dense delta on a fresh unsharded model; a resume from the distributed checkpoint after epoch 1, once at an interval
boundary and once inside an interval (where the active block's optimizer state must be read back). The probe
(``scripts/fsdp2_lisa_probe.py``) records at every step what FSDP2 reduce-scattered and what the optimizer holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lit_helpers import run_two_ranks
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import fsdp2_checks as checks  # noqa: E402

from lightning_peft.methods.lisa import LayerSampler  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(checks.fsdp2_unavailable() is not None, reason=str(checks.fsdp2_unavailable())),
]

#: intervals [0, 1], [2, 3], [4, 5], [6, 7] draw blocks 1, 0, 1, 1: two switches, a redraw, resume at a boundary
SPEC = {"class": "LISA", "init_args": {"n_layers": 1, "interval": 2}}
#: intervals [0-2], [3-5], [6, 7] draw 1, 0, 1: the checkpoint after step 4 is inside the interval of block 0
INSIDE = {"class": "LISA", "init_args": {"n_layers": 1, "interval": 3}}
#: weighted draws (inclusion 0.75 / 0.25): blocks 0, 1, 0, 0
WEIGHTED = {"class": "LISA", "init_args": {"n_layers": 1, "interval": 2, "probabilities": [3, 1]}}
ALWAYS = ("model.embed_tokens.", "model.norm.", "lm_head.")


def _draws(spec: dict) -> list[list[int]]:
    args = spec["init_args"]
    sampler = LayerSampler(2, args["n_layers"], args["interval"], 0, args.get("probabilities"))
    return [sampler.active(k) for k in range(8)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    return checks.run(tmp_path_factory.mktemp("lisa_fsdp2") / "fsdp2", "fsdp2", SPEC)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return checks.run(tmp_path_factory.mktemp("lisa_single") / "single", "single", SPEC)


def test_the_schedule_switches_during_the_run() -> None:
    for spec in (SPEC, INSIDE, WEIGHTED):
        draws = _draws(spec)
        assert sum(a != b for a, b in zip(draws, draws[1:], strict=False)) >= 2, spec


def test_lisa_params_are_sharded_and_both_ranks_end_identical(straight) -> None:
    checks.check_sharded(straight)
    assert all(straight["info"][0]["dtensor"].values()), "LISA's blocks and always-on modules are all FSDP2 DTensors"


def test_lisa_under_fsdp2_equals_one_process(straight, single) -> None:
    diff = checks.check_matches_single(straight, single)
    print(f"LISA FSDP2 vs one process: max |diff| {diff:.3g}")
    state = straight["info"][0]["state"]
    assert [a for _, a in state["history"]] == _draws(SPEC)[::2]
    assert state["counts"] == [2, 6]


def test_the_saved_delta_is_unsharded_todays_format_and_reproduces_the_outputs(straight, single) -> None:
    checks.check_result_reproduces_outputs(straight)
    sharded, plain = straight["out"] / "result", single["out"] / "result"
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in plain.iterdir())
    config, reference = (json.loads((d / "adapter_config.json").read_text()) for d in (sharded, plain))
    assert config == reference and config["delta_format"] == "dense"
    written, expected = (load_file(d / "adapter_model.safetensors") for d in (sharded, plain))
    assert written.keys() == expected.keys()
    assert checks.max_difference(written, expected) <= checks.ATOL
    full = checks.params(straight)
    assert all(written[k].shape == full[k].shape for k in written), "the delta holds full tensors, not shards"


def test_resume_at_an_interval_boundary_equals_the_uninterrupted_run(tmp_path, straight) -> None:
    diff = checks.check_resume(tmp_path, SPEC, straight)
    print(f"LISA FSDP2 resume at a boundary: max |diff| {diff:.3g}")


def test_resume_inside_an_interval_continues_the_active_blocks_optimizer_state(tmp_path) -> None:
    straight = checks.run(tmp_path / "straight", "fsdp2", INSIDE)
    checks.check_sharded(straight)
    diff = checks.check_resume(tmp_path, INSIDE, straight)
    print(f"LISA FSDP2 resume inside an interval: max |diff| {diff:.3g}")


def test_weighted_draws_under_fsdp2_equal_one_process(tmp_path) -> None:
    sharded = checks.run(tmp_path / "fsdp2", "fsdp2", WEIGHTED)
    checks.check_sharded(sharded)
    diff = checks.check_matches_single(sharded, checks.run(tmp_path / "single", "single", WEIGHTED))
    print(f"LISA (probabilities) FSDP2 vs one process: max |diff| {diff:.3g}")
    assert [a for _, a in sharded["info"][0]["state"]["history"]] == _draws(WEIGHTED)[::2]


def _probe(out: Path, spec: dict, variant: str = "") -> list[dict]:
    return run_two_ranks("fsdp2_lisa_probe.py", out, json.dumps(spec["init_args"]), variant)[1]


@pytest.mark.parametrize("variant", ["", "noreshard", "bf16"])
def test_fsdp2_reduce_scatters_exactly_the_active_blocks_and_frozen_ones_hold_nothing(tmp_path, variant) -> None:
    logs = _probe(tmp_path, SPEC, variant)
    draws = _draws(SPEC)
    for log in logs:
        names, local = log["names"], log["local_numel"]
        always = {n for n in names if n.startswith(ALWAYS)}
        assert len(log["steps"]) == 8
        for record, active in zip(log["steps"], draws, strict=True):
            expected = always | {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in active)}
            assert record["active"] == active
            assert set(record["trainable"]) == expected
            # FSDP2 reduce-scattered exactly these: a block frozen after FSDP2's lazy init (block 1 at step 2) is
            # not, a block frozen before it and unfrozen later (block 0 at step 2) is again
            assert set(record["reduced"]) == expected, record["step"]
            assert set(record["with_grad"]) == expected and record["grads_sharded"]  # frozen blocks: grad None
            assert set(record["state_before"]) <= expected  # a block that went frozen lost its state
            assert set(record["state_after"]) == expected
            # every state is this rank's shard only: exp_avg and exp_avg_sq of the local slices of what trains
            assert record["state_numel_after"] == 2 * sum(local[n] for n in expected)
        assert {i for a in draws for i in a} == {0, 1}
        switch_in = log["steps"][2]  # block 1 went frozen, block 0 came in: state of the always-on modules only
        assert set(switch_in["state_before"]) == always


def test_what_cannot_work_is_refused_before_training(tmp_path) -> None:
    unsharded = [log["error"] for log in _probe(tmp_path / "unsharded", SPEC, "unsharded")]
    assert all("not sharded by FSDP2" in e and "lightning_peft.shard" in e for e in unsharded), unsharded
    unequal = [log["error"] for log in _probe(tmp_path / "unequal", SPEC, "unequal")]
    assert all("different base weights" in e for e in unequal), unequal
    single_file = [log["error"] for log in _probe(tmp_path / "fullckpt", SPEC, "fullckpt")]
    assert all("distributed checkpoints (folders) only" in e for e in single_file), single_file
