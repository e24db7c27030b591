#!/usr/bin/env bash
# A plain `pip install lightning-peft` (no extras) in a fresh venv: the zoo CLI and a timm fit must work.
# An import of a package that is not a declared dependency fails here (issue #20 item 1), and a recipe that needs
# an extra must say which one. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PYTHON -m venv "$work/venv"
pip="$work/venv/bin/python -m pip --quiet"
$pip install --upgrade pip
$pip install torch==2.14.1 torchvision==0.29.1
$pip install .
export HF_HUB_OFFLINE=1 LIGHTNING_PEFT_ZOO="$work/zoo"
cd "$work"  # not the source tree: the installed package is what runs
venv/bin/lightning-peft zoo list
venv/bin/lightning-peft zoo search --method LoRA
venv/bin/lightning-peft --help >"$work/help.txt"
grep -q "lightning-peft zoo" "$work/help.txt" || { echo "lightning-peft --help does not name the zoo" >&2; exit 1; }
# a transformers recipe without the [llm] extra: a failure that names the extra, not a bare ModuleNotFoundError
if venv/bin/lightning-peft fit --config "$src/examples/llama_lisa.yaml" >"$work/llm.txt" 2>&1; then
    echo "examples/llama_lisa.yaml ran without transformers installed?" >&2; exit 1
fi
grep -m1 'pip install "lightning-peft\[llm\]"' "$work/llm.txt" || { tail -20 "$work/llm.txt" >&2; exit 1; }
venv/bin/python - <<'PY'
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import LoRA
from lightning_peft.tasks import ImageClassifier

torch.manual_seed(0)
module = ImageClassifier(
    "vit_tiny_patch16_224",
    model_kwargs={"img_size": 8, "patch_size": 4, "in_chans": 1, "depth": 1, "embed_dim": 16, "num_heads": 2},
    lr=1e-2,
)
data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, callbacks=[LoRA(r=2, modules_to_save=["head"], save_dir="adapter")])
trainer.fit(module, DataLoader(data, batch_size=8))
assert (trainer.callbacks[0].saved_to / "adapter_model.safetensors").exists()
print("plain install: zoo CLI and a timm LoRA fit work")
PY
