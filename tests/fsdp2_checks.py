"""What every method's FSDP2 test checks, on runs of ``tests/scripts/fsdp2_fit.py`` (one module, one place).

A method passes when, under 2-process FSDP2 (``lightning_peft.shard``): every parameter gathered in full is
identical on both ranks; it equals (<= ``ATOL``) one unsharded process trained on the union of both ranks'
batches; its decisions (the callback's ``state_dict``) equal that process's; the saved result, loaded onto a fresh
unsharded model, reproduces the sharded model's outputs; and a resume from the sharded (distributed) checkpoint
after one epoch equals the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_fit.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script's constants
ATOL = 1e-5


def fsdp2_unavailable() -> str | None:
    """Why FSDP2 on CPU cannot run here, or None."""
    try:
        import torch.distributed as dist
        from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"FSDP2 / ModelParallelStrategy not importable: {err}"
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    return None


def run(out: Path, mode: str, spec: dict[str, Any], timeout: int = 300) -> dict[str, Any]:
    """Run the script; per rank, its tensors and its info (one entry for ``single``; none for ``first``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SCRIPT.parents[2],
    )
    if mode == "first":  # killed after its first epoch's checkpoint
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-6000:]
        return {"out": out}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = (0,) if mode == "single" else (0, 1)
    return {
        "out": out,
        "family": spec.get("family", "llama"),
        "tensors": [load_file(out / f"rank{r}.safetensors") for r in ranks],
        "info": [torch.load(out / f"rank{r}.pt", weights_only=False) for r in ranks],
    }


def params(result: dict[str, Any], rank: int = 0) -> dict[str, torch.Tensor]:
    return {k.removeprefix("param."): v for k, v in result["tensors"][rank].items() if k.startswith("param.")}


def assert_same(a: Any, b: Any, atol: float = 0.0, where: str = "") -> None:
    """Nested dicts/lists/tensors/numbers equal (tensors within ``atol``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=atol, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], atol, f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= max(atol, 1e-12), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def check_sharded(result: dict[str, Any]) -> None:
    """The base weights really were sharded, and the two ranks ended identical (bit for bit)."""
    info = result["info"][0]
    assert info["world_size"] == 2
    assert any(info["dtensor"].values()), "nothing was sharded"
    assert_same(result["tensors"][0], result["tensors"][1], 0.0, "rank0 vs rank1")
    assert_same(result["info"][0]["state"], result["info"][1]["state"], 0.0, "callback state rank0 vs rank1")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def check_matches_single(result: dict[str, Any], single: dict[str, Any], atol: float = ATOL) -> float:
    """Sharded == one unsharded process: every parameter, the outputs, and the decisions. Returns the max diff."""
    diff = max_difference(params(result), params(single))
    assert diff <= atol, f"FSDP2 vs one process: max |diff| {diff:.3g} > {atol}"
    torch.testing.assert_close(result["tensors"][0]["logits"], single["tensors"][0]["logits"], rtol=0, atol=10 * atol)
    assert_same(result["info"][0]["state"], single["info"][0]["state"], atol, "callback state")
    assert_same(result["info"][0]["schedule"], single["info"][0]["schedule"], atol, "schedule")
    return diff


def check_result_reproduces_outputs(result: dict[str, Any]) -> None:
    """The saved result on a fresh unsharded model gives the sharded model's outputs (and the base's do differ)."""
    from fsdp2_fit import LOGIT_SEED
    from tiny_models import FAMILIES, forward

    from lightning_peft.adapters import load_adapter

    logits, family = result["tensors"][0]["logits"], result["family"]
    with torch.no_grad():
        plain = forward(family, FAMILIES[family](seed=0), batch=2, seed=LOGIT_SEED)
        assert not torch.allclose(plain, logits, atol=1e-4), "training did not change the outputs"
        model = FAMILIES[family](seed=0)
        load_adapter(model, result["out"] / "result")
        torch.testing.assert_close(forward(family, model, batch=2, seed=LOGIT_SEED), logits, rtol=1e-5, atol=1e-5)


def check_resume(tmp: Path, spec: dict[str, Any], straight: dict[str, Any]) -> float:
    """One epoch, a distributed checkpoint, SIGKILL, a resume to the end: equal to the uninterrupted run."""
    run(tmp / "resumed", "first", spec)
    assert (tmp / "resumed" / "ckpt.ckpt").is_dir(), "ModelParallelStrategy writes a distributed checkpoint (a folder)"
    assert not (tmp / "resumed" / "rank0.pt").exists(), "the first run was not killed before its end"
    resumed = run(tmp / "resumed", "resume", spec)
    check_sharded(resumed)
    assert resumed["info"][0]["step"] == straight["info"][0]["step"]
    diff = max_difference(params(resumed), params(straight))
    assert diff <= ATOL, f"resumed vs uninterrupted: max |diff| {diff:.3g}"
    assert_same(resumed["info"][0]["state"], straight["info"][0]["state"], ATOL, "callback state after resume")
    return diff
