"""A recipe trains sharded by naming the strategy alone: the ``lightning_peft.tasks`` modules shard themselves.

``examples/llama_lisa.yaml`` with ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` and 2
devices, through the real ``lightning-peft fit`` console script (Lightning relaunches it for rank 1). The module's
``configure_model`` calls ``lightning_peft.shard``: the run trains, LISA switches blocks, and the delta is written once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fsdp2_checks import fsdp2_unavailable

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(fsdp2_unavailable() is not None, reason=str(fsdp2_unavailable()))]


def test_llama_lisa_recipe_trains_under_fsdp2(tmp_path) -> None:
    override = {
        "trainer": {
            "strategy": {
                "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
            },
            "devices": 2,
            "max_steps": 4,
            "max_epochs": None,
            "logger": False,
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
        },
        "data": {"init_args": {"batch_size": 4}},
    }
    (tmp_path / "fsdp2.yaml").write_text(yaml.safe_dump(override))
    script = Path(sys.executable).with_name("lightning-peft")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_peft.cli"]
    cmd += ["fit", "--config", str(ROOT / "examples/llama_lisa.yaml"), "--config", str(tmp_path / "fsdp2.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "CausalLMModule: sharded LlamaForCausalLM with FSDP2 (4 blocks + the root)" in log
    assert "LISA: 2 of 4 blocks" in log and "max_steps=4" in log
    delta = tmp_path / "runs" / "llama_lisa" / "delta"  # the recipe's ${trainer.default_root_dir}, resolved on load
    assert "LISA: result saved to" in log
    assert (delta / "adapter_model.safetensors").is_file() and (delta / "lisa_layers.png").is_file()
