"""The ViT-on-digits task (timm ViT on scikit-learn digits, CPU; the first quickstart) with full fine-tuning, LoRA
and AdaLoRA, in one run.

Not a test. Same model, data, seed, epochs and learning-rate per method as the recipes
`examples/vit_digits_lora.yaml` and `examples/vit_digits_adalora.yaml` (full fine-tuning uses LoRA's 1e-3); prints
validation accuracy, fit time, trainable parameters and the ratios against full fine-tuning.

    python benchmarks/quickstart_methods.py [--epochs 15] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import quiet_cpu_trainer  # noqa: E402

from lightning_peft import AdaLoRA, LoRA  # noqa: E402
from lightning_peft.adapters import count_parameters  # noqa: E402
from lightning_peft.tasks import DigitsDataModule, ImageClassifier  # noqa: E402

VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "depth": 6}


def run(method: str, epochs: int) -> dict:
    pl.seed_everything(0, verbose=False)
    callbacks: list[pl.Callback] = []
    lr = 1e-3
    if method == "lora":
        callbacks.append(LoRA(r=8, alpha=16, modules_to_save=["head"]))
    elif method == "adalora":
        callbacks.append(AdaLoRA(r=12, target_r=8, alpha=16, tinit=50, tfinal=100, deltaT=10, modules_to_save=["head"]))
        lr = 3e-3
    module = ImageClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT, lr=lr)
    trainer = quiet_cpu_trainer(max_epochs=epochs, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, DigitsDataModule())
    seconds = time.perf_counter() - start
    trainable, total = count_parameters(module)
    return {
        "acc": float(trainer.callback_metrics["val_acc"]),
        "seconds": seconds,
        "trainable": trainable,
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = {m: run(m, args.epochs) for m in ("full", "lora", "adalora")}
    full = results["full"]
    lines = [
        f"Quickstart task, {datetime.date.today()}, {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; ViT (6 blocks, width 192) on sklearn digits, {args.epochs} epochs, seed 0",
        "",
        "| method | val accuracy | fit time (s) | time vs full FT | trainable params | trainable share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("full", "full fine-tuning"), ("lora", "LoRA r=8"), ("adalora", "AdaLoRA r=12 -> 8")):
        r = results[name]
        lines.append(
            f"| {label} | {100 * r['acc']:.1f} % | {r['seconds']:.1f} | {r['seconds'] / full['seconds']:.2f} "
            f"| {r['trainable']:,} | {100 * r['trainable'] / r['total']:.1f} % |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
