"""Resume after a real SIGKILL mid-epoch (and, for AdaLoRA, mid accumulation window) equals the uninterrupted run.

Issue 12, items 2 and 3. ``tests/scripts/killed_fit.py`` trains on the project's own ``DigitsDataModule`` (shuffled),
checkpoints every 5 optimizer steps, and SIGKILLs itself at step 33: the last checkpoint (step 30) is in the middle of
the second epoch. The resumed run must train on exactly the batches the uninterrupted run trained on after step 30,
end with bit-identical weights, and (AdaLoRA, ``accumulate_grad_batches=2``) record the same masking history, with no
step allocated twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "killed_fit.py"


def run(out: Path, method: str, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), method, mode], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "ssf", "hft", "spiel"])
def test_resume_after_sigkill_mid_epoch_is_exact(method: str, tmp_path) -> None:
    straight = run(tmp_path / "straight", method, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run(tmp_path / "run", method, "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # really killed, not a clean stop
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = run(tmp_path / "run", method, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("straight", "run"))
    assert a["step"] == b["step"]
    seen_after_resume = len(b["labels"])
    assert 0 < seen_after_resume < len(a["labels"]) and seen_after_resume % 45 != 0  # resumed mid-epoch
    assert b["labels"] == a["labels"][-seen_after_resume:]  # the same batches, in the same order
    if method == "adalora":
        assert b["history"] == a["history"]
        steps = [s for s, _ in b["history"]]
        assert len(steps) == len(set(steps))  # no masking step allocated twice
    wa, wb = (load_file(str(tmp_path / d / "result.safetensors")) for d in ("straight", "run"))
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert (wa[key] == wb[key]).all(), key  # bit-identical
