"""HFT under 2-process FSDP2 (``ModelParallelStrategy`` + ``lightning_peft.shard``, gloo): the same run as one process.

HFT shares LISA's freezing machinery (``callbacks/scheduled.py``), so it gets LISA's FSDP2 path; these runs check it
for HFT's units (parameter groups inside blocks rather than whole blocks) on the shared harness
(``scripts/fsdp2_fit.py``, checks in ``fsdp2_checks.py``): 8 optimizer steps (2 epochs x 4), a new half every 3 steps,
against one unsharded process on the union of both ranks' batches; the saved dense delta on a fresh unsharded model;
a resume from the distributed checkpoint after epoch 1 (step 4, inside the round of steps 3-5, where the active
groups' optimizer state must be read back from the checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import fsdp2_checks as checks  # noqa: E402

from lightning_peft.methods.hft import HalfSelector  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(checks.fsdp2_unavailable() is not None, reason=str(checks.fsdp2_unavailable())),
]

SPEC = {"class": "HFT", "init_args": {"interval": 3, "seed": 0}}
SELECTOR = HalfSelector([[4, 3, 2], [4, 3, 2]], interval=3, seed=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    return checks.run(tmp_path_factory.mktemp("hft_fsdp2") / "fsdp2", "fsdp2", SPEC)


def test_the_halves_change_during_the_run() -> None:
    rounds = [tuple(SELECTOR.active(k)) for k in (0, 3, 6)]
    assert len(set(rounds)) == 3 and set(rounds[1]) - set(rounds[0]), "no group unfrozen later: a weak test"


def test_hft_params_are_sharded_and_both_ranks_end_identical(straight) -> None:
    checks.check_sharded(straight)
    assert all(straight["info"][0]["dtensor"].values()), "HFT's groups and always-on modules are all FSDP2 DTensors"
    state = straight["info"][0]["state"]
    assert [a for _, a in state["history"]] == [SELECTOR.active(k) for k in (0, 3, 6)]


def test_hft_under_fsdp2_equals_one_process_and_its_delta_reproduces_the_outputs(tmp_path, straight) -> None:
    diff = checks.check_matches_single(straight, checks.run(tmp_path / "single", "single", SPEC))
    print(f"HFT FSDP2 vs one process: max |diff| {diff:.3g}")
    checks.check_result_reproduces_outputs(straight)


def test_resume_inside_a_round_continues_the_active_groups_optimizer_state(tmp_path, straight) -> None:
    diff = checks.check_resume(tmp_path, SPEC, straight)
    print(f"HFT FSDP2 resume inside a round: max |diff| {diff:.3g}")
