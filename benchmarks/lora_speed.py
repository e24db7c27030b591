"""LoRA speed and memory: full fine-tuning vs our LoRA vs peft's LoRA, side by side in one run.

Not a test (STYLE.md item 13). Two backbones built from configs with random weights (nothing is
downloaded): a transformers ``LlamaForCausalLM`` and a timm ``vit_small_patch16_224``-style ViT. For
each backbone, three methods are measured on the same model (same seed) and the same inputs:

* ``full FT``: every parameter trainable;
* ``our LoRA``: :func:`lightning_peft.adapters.inject_adapters` on the backbone's preset targets;
* ``peft LoRA``: ``peft.get_peft_model`` with the same ``r``, ``alpha`` and targets, dropout 0.

Per (backbone, method): median training-step time (forward + loss + backward + AdamW step +
``zero_grad``) over ``--steps`` steps after ``--warmup``; median inference forward time (eval,
``no_grad``) unmerged and, for the two LoRAs, after merging; trainable parameters; AdamW state bytes
after the first step; and peak memory during training. On CUDA that is
``torch.cuda.max_memory_allocated``; on CPU it is the peak RSS of a fresh subprocess, so every
(backbone, method) runs in its own fresh worker process (``harness.run_worker``) on either device.

Before timing, once per backbone, our LoRA and peft's are checked to compute the same function: both
are injected into copies of one model, our non-zero ``lora_A``/``lora_B`` are copied into peft's
``lora_A.default.weight``/``lora_B.default.weight``, and the logits must agree (atol 1e-4). The run
aborts otherwise: timing two different computations would be meaningless.

    python benchmarks/lora_speed.py --size small
    python benchmarks/lora_speed.py --size tiny --steps 3 --warmup 1     # seconds, a smoke check
    python benchmarks/lora_speed.py --size medium --device cuda --markdown lora_speed.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import llama_config, record  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from harness import (  # noqa: E402
    NOISY,
    PeakMemory,
    Report,
    WorkerFailed,
    add_common_args,
    fastest,
    markdown_table,
    measure_each,
    measure_steps,
    mib,
    ms,
    optimizer_state_bytes,
    parse_args,
    ratio,
    run_worker,
)
from torch import nn  # noqa: E402

BACKBONES = ("llama", "vit")
METHODS = ("full", "ours", "peft")
LABELS = {"full": "full FT", "ours": "our LoRA", "peft": "peft LoRA"}

# Sizes: "small" keeps one training step to a second or two on 2 CPU cores.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "llama": dict(hidden=128, intermediate=344, layers=2, heads=4, vocab=1024, seq=64, batch=2),
        "vit": dict(img=64, dim=128, depth=2, heads=4, batch=4),
    },
    "small": {
        "llama": dict(hidden=512, intermediate=1376, layers=4, heads=8, vocab=4096, seq=256, batch=4),
        "vit": dict(img=128, dim=384, depth=6, heads=6, batch=8),
    },
    "medium": {
        "llama": dict(hidden=1024, intermediate=2752, layers=8, heads=16, vocab=8192, seq=512, batch=4),
        "vit": dict(img=224, dim=384, depth=12, heads=6, batch=16),
    },
}
NUM_CLASSES = 10
N_BATCHES = 4  # distinct input batches, cycled through the steps


# ----------------------------------------------------------------------------------------------- models and data


def build_model(backbone: str, size: dict[str, int], seed: int) -> nn.Module:
    """The backbone with deterministic random weights (same ``seed`` -> same weights in every process)."""
    torch.manual_seed(seed)
    if backbone == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(size))
    import timm

    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        num_classes=NUM_CLASSES,
        img_size=size["img"],
        embed_dim=size["dim"],
        depth=size["depth"],
        num_heads=size["heads"],
    )


def make_batches(backbone: str, size: dict[str, int], seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(N_BATCHES):
        if backbone == "llama":
            ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
            batches.append({"x": ids.to(device), "y": ids.to(device)})
        else:
            img = torch.randn(size["batch"], 3, size["img"], size["img"], generator=gen)
            y = torch.randint(0, NUM_CLASSES, (size["batch"],), generator=gen)
            batches.append({"x": img.to(device), "y": y.to(device)})
    return batches


def logits(backbone: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if backbone == "llama":
        return model(input_ids=x, use_cache=False).logits
    return model(x)


def loss_of(backbone: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if backbone == "llama":
        return model(input_ids=batch["x"], labels=batch["y"], use_cache=False).loss
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def targets_of(model: nn.Module) -> list[str]:
    from lightning_peft.backbones import default_target_modules

    targets = default_target_modules(model)
    if not targets:
        raise RuntimeError(f"no preset target_modules for {type(model).__name__}")
    return list(targets)


def apply_method(method: str, model: nn.Module, args: argparse.Namespace, init: str = "kaiming") -> nn.Module:
    """``model`` prepared for ``method`` (LoRA layers injected, the rest frozen); may return a wrapper."""
    targets = targets_of(model)
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "ours":
        from lightning_peft.adapters import LoRAConfig, inject_adapters

        inject_adapters(model, LoRAConfig(r=args.r, alpha=args.alpha, target_modules=targets, init=init))
        return model
    import peft

    return peft.get_peft_model(
        model, peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0)
    )


# ----------------------------------------------------------------------------------------------- measurement


def time_inference(backbone: str, model: nn.Module, x: torch.Tensor, device: torch.device, n: int) -> float:
    """Median eval-mode ``no_grad`` forward over ``n`` passes after two warm-up passes."""

    def forward(i: int, timer: Any) -> None:
        logits(backbone, model, x)

    model.eval()
    with torch.no_grad():
        return measure_steps(forward, n, 2, device)["step_s"]


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """One (backbone, method) in this (fresh) process: training steps, inference, memory."""
    device = torch.device(args.device)
    size = SIZES[args.size][args.backbone]
    base = build_model(args.backbone, size, args.seed)
    total_params = sum(p.numel() for p in base.parameters())
    model = apply_method(args.method, base, args).to(device)
    batches = make_batches(args.backbone, size, args.seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    memory = PeakMemory(device).start()
    opt_bytes = []

    def step(i: int, timer: Any) -> torch.Tensor:
        loss = loss_of(args.backbone, model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            opt_bytes.append(optimizer_state_bytes(opt))
        return loss.detach()

    timed = measure_steps(step, args.steps, args.warmup, device)
    figures = memory.figures()

    infer_n = max(3, args.steps)
    x = batches[0]["x"]
    infer = time_inference(args.backbone, model, x, device, infer_n)
    infer_merged = None
    if args.method == "ours":
        from lightning_peft.adapters import merge_adapters

        merge_adapters(model)
        infer_merged = time_inference(args.backbone, model, x, device, infer_n)
    elif args.method == "peft":
        model.merge_adapter()
        infer_merged = time_inference(args.backbone, model, x, device, infer_n)

    return {
        "backbone": args.backbone,
        "method": args.method,
        "trainable": trainable,
        "total": total_params,
        **{k: timed[k] for k in ("step_s", "step_min_s", "step_max_s", "others_cpu_share")},
        "infer_s": infer,
        "infer_merged_s": infer_merged,
        "opt_state_bytes": opt_bytes[0],
        **figures,
        "first_loss": timed["losses"][0],
        "last_loss": timed["losses"][-1],
    }


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Our LoRA and peft's, with the same non-zero A/B, must give the same logits on the same model."""
    from lightning_peft.adapters import adapter_layers

    device = torch.device(args.device)
    size = SIZES[args.size][args.backbone]
    base = build_model(args.backbone, size, args.seed).to(device).eval()
    ours = apply_method("ours", copy.deepcopy(base), args, init="nonzero").eval()
    theirs = apply_method("peft", copy.deepcopy(base), args).eval()
    our_layers = dict(adapter_layers(ours))
    peft_modules = dict(theirs.base_model.model.named_modules())
    peft_adapted = sorted(n for n, m in peft_modules.items() if hasattr(m, "lora_A") and "default" in m.lora_A)
    if sorted(our_layers) != peft_adapted:
        only_ours = sorted(set(our_layers) - set(peft_adapted))
        only_peft = sorted(set(peft_adapted) - set(our_layers))
        raise RuntimeError(f"adapted layers differ: only ours {only_ours[:5]}, only peft {only_peft[:5]}")
    with torch.no_grad():
        for name, layer in our_layers.items():
            target = peft_modules[name]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            if abs(target.scaling["default"] - layer.scaling) > 1e-12:
                raise RuntimeError(f"{name}: scaling differs, ours {layer.scaling} vs peft {target.scaling['default']}")
        x = make_batches(args.backbone, size, args.seed, device)[0]["x"]
        y_base = logits(args.backbone, base, x)
        y_ours = logits(args.backbone, ours, x)
        y_peft = logits(args.backbone, theirs, x)
    diff = (y_ours - y_peft).abs().max().item()
    moved = (y_ours - y_base).abs().max().item()
    try:
        torch.testing.assert_close(y_ours, y_peft, atol=1e-4, rtol=1e-4)
    except AssertionError as err:
        raise RuntimeError(f"our LoRA and peft's LoRA give different logits:\n{err}") from None
    if moved < 1e-3:
        raise RuntimeError(f"the non-zero adapters did not change the logits (max change {moved:.2e}); check is void")
    return {
        "backbone": args.backbone,
        "layers": len(our_layers),
        "targets": targets_of(base),
        "max_abs_diff": diff,
        "max_change": moved,
    }


# ----------------------------------------------------------------------------------------------- driver


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine repeats: the fastest median step/inference times (outside load only ever slows a run down)."""
    best = fastest(runs)
    for key in ("infer_s", "infer_merged_s"):
        values = [r[key] for r in runs if r[key] is not None]
        best[key] = min(values) if values else None
    best["step_min_s"] = min(r["step_min_s"] for r in runs)
    best["step_max_s"] = max(r["step_max_s"] for r in runs)
    return best


def table(
    backbone: str, size: dict[str, int], res: dict[str, dict[str, Any]], check: dict[str, Any], args: argparse.Namespace
) -> list[str]:
    full, ours, peft = res["full"], res["ours"], res["peft"]
    if backbone == "llama":
        what = (
            f"LlamaForCausalLM hidden {size['hidden']}, intermediate {size['intermediate']}, "
            f"{size['layers']} layers, {size['heads']} heads, vocab {size['vocab']}; "
            f"batch {size['batch']} x {size['seq']} tokens"
        )
    else:
        what = (
            f"ViT (vit_small_patch16_224 layout) dim {size['dim']}, depth {size['depth']}, {size['heads']} heads, "
            f"{size['img']}px images, {NUM_CLASSES} classes; batch {size['batch']}"
        )
    mem = "peak CUDA alloc" if args.device == "cuda" else "peak RSS"
    lines = [
        f"### {backbone}: {what}",
        "",
        f"{full['total']:,} parameters; LoRA r={args.r}, alpha={args.alpha:g} on {check['layers']} layers "
        f"({', '.join(check['targets'])}); equivalence check: max |logit diff| ours vs peft "
        f"{check['max_abs_diff']:.1e} (adapters move logits by {check['max_change']:.1e}).",
        "",
    ]
    columns = ["method", "trainable params", "trainable %", "step (ms)", "step / full FT", "step / peft", "infer (ms)"]
    columns += ["infer / peft", "infer merged (ms)", "merged / peft", "AdamW state (MiB)", f"{mem} growth (MiB)"]
    columns += ["growth / full FT", f"{mem} (MiB)"]
    rows = [
        [
            LABELS[key],
            f"{r['trainable']:,}",
            f"{100 * r['trainable'] / full['trainable']:.2f}",
            ms(r["step_s"]),
            ratio(r["step_s"], full["step_s"]),
            ratio(r["step_s"], peft["step_s"]),
            ms(r["infer_s"]),
            ratio(r["infer_s"], peft["infer_s"]),
            ms(r["infer_merged_s"]),
            ratio(r["infer_merged_s"], peft["infer_merged_s"]),
            mib(r["opt_state_bytes"]),
            mib(r["peak_growth_bytes"]),
            ratio(r["peak_growth_bytes"], full["peak_growth_bytes"]),
            mib(r["peak_bytes"]),
        ]
        for key, r in ((k, res[k]) for k in METHODS)
    ]
    lines += markdown_table(columns, rows)
    lines += [
        "",
        f"ours / peft: step {ratio(ours['step_s'], peft['step_s'])}, "
        f"inference {ratio(ours['infer_s'], peft['infer_s'])}"
        f" (merged {ratio(ours['infer_merged_s'], peft['infer_merged_s'])}), {mem} growth "
        f"{ratio(ours['peak_growth_bytes'], peft['peak_growth_bytes'])}. "
        f"LoRA / full FT step: ours {ratio(ours['step_s'], full['step_s'])}, "
        f"peft {ratio(peft['step_s'], full['step_s'])}; "
        f"{mem} growth: ours {ratio(ours['peak_growth_bytes'], full['peak_growth_bytes'])}, "
        f"peft {ratio(peft['peak_growth_bytes'], full['peak_growth_bytes'])}. "
        "Step range (min-max ms): "
        + ", ".join(f"{LABELS[k]} {ms(res[k]['step_min_s'])}-{ms(res[k]['step_max_s'])}" for k in METHODS)
        + ".",
    ]
    record("lora_speed", f"{backbone}: our LoRA step / peft LoRA step", ours["step_s"] / peft["step_s"])
    record(
        "lora_speed",
        f"{backbone}: our LoRA memory growth / peft's",
        ours["peak_growth_bytes"] / peft["peak_growth_bytes"],
    )
    if any(len(res[k]["repeat_step_s"]) > 1 for k in METHODS):
        lines[-1] += (
            " Median step of each run (ms): "
            + "; ".join(f"{LABELS[k]} " + ", ".join(ms(v) for v in res[k]["repeat_step_s"]) for k in METHODS)
            + "."
        )
    shares = {k: res[k]["others_cpu_share"] for k in METHODS}
    if all(v is not None for v in shares.values()):
        lines[-1] += (
            " Other processes' share of the CPUs during the timed steps: "
            + ", ".join(f"{LABELS[k]} {100 * v:.0f} %" for k, v in shares.items())
            + "."
        )
        noisy = [LABELS[k] for k, v in shares.items() if v > NOISY]
        if noisy:
            lines += [
                "",
                f"**Warning**: other processes took over {100 * NOISY:.0f} % of the CPUs while "
                f"{', '.join(noisy)} ran; those times are inflated. Rerun on an idle machine, or with "
                "--wait-idle / --noisy-retries / --repeats.",
            ]
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=list(SIZES))
    add_common_args(parser, steps=10, warmup=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated subset of llama,vit")
    args = parse_args(parser)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbones or any(b not in BACKBONES for b in backbones):
        parser.error(f"--backbones must be a comma-separated subset of {','.join(BACKBONES)}")
    if importlib.util.find_spec("peft") is None:
        sys.exit("error: peft is not installed; this benchmark compares against it: pip install peft")

    report = Report(args)
    report.header(
        "# LoRA speed: full FT vs our LoRA vs peft LoRA",
        packages=("peft", "transformers", "timm"),
        details=f"Size preset `{args.size}`, median of {args.steps} steps after {args.warmup} warm-up; every "
        "(backbone, method) in a fresh process"
        + (f"; fastest of {args.repeats} interleaved repeats" if args.repeats > 1 else "")
        + (f"; up to {args.noisy_retries} re-runs of a disturbed measurement" if args.noisy_retries else "")
        + ".",
    )
    spec = vars(args)
    for backbone in backbones:
        try:
            check = run_worker(run_check, spec | {"backbone": backbone}, threads=args.threads, label="check")
        except WorkerFailed as err:
            sys.exit(
                f"{err.output}\nerror: equivalence check for {backbone} failed (exit {err.returncode}): our LoRA and "
                "peft's do not compute the same thing, so timing them side by side would be meaningless; see above"
            )
        res = measure_each(
            METHODS,
            lambda m, b=backbone: run_worker(run_train, spec | {"backbone": b, "method": m}, threads=args.threads),
            args,
            combine=best_of,
        )
        report.print(table(backbone, SIZES[args.size][backbone], res, check, args))
    report.close()


if __name__ == "__main__":
    main()
