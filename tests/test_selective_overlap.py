"""``SelectiveDDPStrategy(overlap=True)``: bucketed all-reduces launched from gradient hooks during the backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lit_helpers import run_two_ranks
from test_distributed import _free_port

from lightning_peft import distributed
from lightning_peft.methods.lisa import LayerSampler
from lightning_peft.strategies import SelectiveDDPStrategy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a finite number > 0"),
        ({"bucket_cap_mb": -1.0}, "bucket_cap_mb must be a finite number > 0"),
        ({"bucket_cap_mb": float("nan")}, "bucket_cap_mb must be a finite number > 0"),
        ({"bucket_cap_mb": float("inf")}, "bucket_cap_mb must be a finite number > 0"),
        ({"bucket_cap_mb": "32"}, "bucket_cap_mb must be a finite number > 0"),
        ({"overlap": "yes"}, "overlap must be True or False"),
        ({"overlap": 1}, "overlap must be True or False"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SelectiveDDPStrategy(**kwargs)


def test_overlap_is_the_default_and_can_be_turned_off() -> None:
    assert SelectiveDDPStrategy().overlap is True
    assert SelectiveDDPStrategy(overlap=False).overlap is False


def test_reducer_buckets_in_order_and_refuses_a_gradient_changed_after_it_was_sent() -> None:
    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (4, 4, 8))
    reducer = distributed.GradientReducer([a, b, c], bucket_bytes=32)  # [a, b], [c]
    assert [len(bucket) for bucket in reducer.buckets] == [2, 1]
    reducer.start()
    assert reducer.ready(c) == 0, "bucket 1 may not go before bucket 0"
    assert reducer.ready(a) == 0 and reducer.ready(b) == 2 and reducer.complete
    with pytest.raises(RuntimeError, match="accumulated again"):
        reducer.ready(a)
    assert reducer.finish() == 0 and reducer.finish() == 0
    with pytest.raises(RuntimeError, match="overlap=False"):
        reducer.ready(c)  # a second backward after the reduction finished
    assert reducer.ready(torch.nn.Parameter(torch.ones(1))) == 0  # not one of its parameters: ignored


def _reducer_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(rank)
        params = [
            torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in [(5, torch.float32)] * 6 + [(3, torch.bfloat16)]
        ]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        params[2].grad = None if rank == 1 else params[2].grad  # missing on rank 1
        params[4].grad = None  # missing everywhere
        expected = [None if p.grad is None else p.grad.clone() for p in params]
        reducer = distributed.GradientReducer(params, bucket_bytes=48)  # 2 float32 grads a bucket
        reducer.start()
        order = params if rank == 0 else params[::-1]  # the gradients arrive in another order on each rank
        launched = [reducer.ready(p) for p in order if p.grad is not None]
        launched.append(reducer.finish())
        out[rank] = {
            "grads": [None if p.grad is None else p.grad.float().tolist() for p in params],
            "dtypes": [str(p.grad.dtype) for p in params if p.grad is not None],
            "local": [None if g is None else g.float().tolist() for g in expected],
            "launched": launched,
            "n_buckets": len(reducer.buckets),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reducer_on_two_processes_matches_the_synchronous_mean_whatever_the_arrival_order() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_reducer_worker, args=(_free_port(), out), nprocs=2, join=True)
        r0, r1 = dict(out[0]), dict(out[1])
    assert r0["grads"] == r1["grads"], "ranks differ"
    assert r0["n_buckets"] == 4 and sum(r0["launched"]) == sum(r1["launched"]) == 4
    assert r0["launched"][:2] == [0, 1] and r1["launched"][-1] == 3  # rank 1 waited for its missing gradient
    assert r0["grads"][4] is None and r0["grads"][2] is not None
    assert r0["dtypes"][-1] == "torch.bfloat16"
    for i, got in enumerate(r0["grads"]):
        if got is None:
            continue
        local = [torch.tensor(r["local"][i]) if r["local"][i] is not None else torch.zeros(len(got)) for r in (r0, r1)]
        want = (local[0] + local[1]) / 2
        tol = 1e-2 if i == 6 else 0
        torch.testing.assert_close(torch.tensor(got), want, rtol=tol, atol=tol, msg=f"param {i}")


def _runs(states: list[dict], run: str) -> list[dict[str, torch.Tensor]]:
    return [{k.split("/", 1)[1]: v for k, v in s.items() if k.startswith(run + "/")} for s in states]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key}: {what}")


@pytest.mark.slow
def test_overlapped_fits_are_bit_identical_across_ranks_and_to_the_synchronous_path(tmp_path) -> None:
    """One script, 5 fits in the same 2 processes (see ``tests/scripts/ddp_overlap.py``)."""
    states, logs = run_two_ranks("ddp_overlap.py", tmp_path)
    for run in ("lisa_overlap", "lisa_sync", "lora_overlap", "lora_sync", "manual"):
        assert logs[0][run]["step"] == logs[1][run]["step"] == 4, run
        ranks = _runs(states, run)
        _assert_same(ranks[0], ranks[1], f"{run}: ranks differ")
        for a, b in zip(logs[0][run]["steps"], logs[1][run]["steps"], strict=True):
            assert a["trainable"] == b["trainable"] and a["with_grad"] == b["with_grad"], run
    for method in ("lisa", "lora"):
        _assert_same(_runs(states, f"{method}_overlap")[0], _runs(states, f"{method}_sync")[0], "overlap != sync")

    # LISA, accumulate_grad_batches=2: the trainable set changed, and only the backward that ends an accumulation
    # (every 2nd) launched buckets, from the hooks, every bucket of it, and finished the reduction in the backward
    lisa = logs[0]["lisa_overlap"]
    assert len({tuple(s["trainable"]) for s in lisa["steps"]}) > 1
    assert len({tuple(LayerSampler(2, 1, 1, seed=0).active(k)) for k in range(4)}) > 1
    sent = [b["in_backward"] for b in lisa["backwards"]]
    assert sent[0] == 0 and sent[1] > 0 and all(sent[i] == sent[i - 1] for i in range(2, 8, 2)), sent
    assert lisa["steps"][-1]["counts"] == {
        "in_backward": sent[-1],
        "after_backward": 0,
        "finished_in_backward": 4,
        "synchronous": 0,
    }
    assert logs[0]["lisa_sync"]["steps"][-1]["counts"]["synchronous"] == 4

    # LoRA with layers unused on some ranks: rank 1 never uses `extra` (zeros there), nobody uses `sometimes` at
    # odd steps (no gradient anywhere); at even steps rank 0 finished in its backward, rank 1 after it
    for rank in (0, 1):
        steps = logs[rank]["lora_overlap"]["steps"]
        extras = [{n for n in s["with_grad"] if not n.startswith("model.")} for s in steps]
        assert (
            extras
            == [{"extra.weight", "extra.bias", "sometimes.weight", "sometimes.bias"}, {"extra.weight", "extra.bias"}]
            * 2
        )
        assert steps[-1]["counts"]["in_backward"] > 0 and steps[-1]["counts"]["synchronous"] == 0
    assert logs[0]["lora_overlap"]["steps"][-1]["counts"]["finished_in_backward"] == 2
    assert logs[1]["lora_overlap"]["steps"][-1]["counts"]["finished_in_backward"] == 0
    # manual optimization: no hook fired, every step reduced synchronously
    assert logs[0]["manual"]["steps"][-1]["counts"] == dict.fromkeys(
        ("in_backward", "after_backward", "finished_in_backward"), 0
    ) | {"synchronous": 4}
