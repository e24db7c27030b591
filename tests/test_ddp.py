"""Two CPU processes under Lightning's real ``ddp`` strategy (gloo): adapters stay identical across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(name: str, out: Path, timeout: int = 300) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SCRIPTS.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_lora_adapters_identical_on_both_ranks(tmp_path) -> None:
    run_script("ddp_lora.py", tmp_path)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0]["step"] == logs[1]["step"] == 8  # 8 batches split over 2 ranks, 2 epochs
    first_epoch = [set(log["seeds"][:4]) for log in logs]
    assert first_epoch[0].isdisjoint(first_epoch[1]), "ranks saw the same data: not a real DDP test"
    assert ranks[0].keys() == ranks[1].keys() and any(".lora_A" in k for k in ranks[0])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs across ranks")
    # rank 0 wrote the adapter once, and it holds the synchronised weights
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = next(k for k in ranks[0] if k.endswith("attn.qkv.lora_B"))
    peft_key = "base_model.model." + key.removeprefix("model.") + ".weight"
    torch.testing.assert_close(saved[peft_key], ranks[0][key])
    # ZooPublisher: gathered on both ranks, published once by rank 0
    from lightning_peft.zoo import LocalZoo

    zoo = LocalZoo(tmp_path / "zoo")
    assert len(zoo.revisions("ddp-vit")) == 1
    published = load_file(zoo.download("ddp-vit") / "adapter_model.safetensors")
    torch.testing.assert_close(published[peft_key], ranks[0][key])
