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
(backbone, method) runs in its own worker process (``--worker``, JSON over stdout) on either device.

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
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
    OthersLoad,
    device_name,
    llama_config,
    peak_rss_bytes,
    record,
    reset_peak_rss,
    rss_bytes,
)
from torch import nn  # noqa: E402

BACKBONES = ("llama", "vit")
METHODS = ("full", "ours", "peft")
LABELS = {"full": "full FT", "ours": "our LoRA", "peft": "peft LoRA"}
RESULT_MARK = "__LORA_SPEED_RESULT__ "

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
NOISY = 0.10  # share of the CPUs used by other processes above which a timing is flagged as disturbed


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
    return total


def time_inference(backbone: str, model: nn.Module, x: torch.Tensor, device: torch.device, n: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(n + 2):  # two warm-up passes
            sync(device)
            t0 = time.perf_counter()
            logits(backbone, model, x)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
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

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
        peak_is_reset = True
    else:
        mem_before = rss_bytes()
        peak_is_reset = reset_peak_rss()
        if not peak_is_reset:  # the high-water mark so far is the best baseline there is
            mem_before = max(mem_before, peak_rss_bytes())

    step_times, opt_bytes, losses = [], 0, []
    others = OthersLoad().start()
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        loss = loss_of(args.backbone, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - t0
        if step == 0:
            opt_bytes = optimizer_state_bytes(opt)
        if step >= args.warmup:
            step_times.append(elapsed)
        losses.append(float(loss.detach()))

    others_share = others.stop()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()

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
        "step_s": statistics.median(step_times),
        "step_min_s": min(step_times),
        "step_max_s": max(step_times),
        "infer_s": infer,
        "infer_merged_s": infer_merged,
        "opt_state_bytes": opt_bytes,
        "mem_before_bytes": mem_before,
        "peak_bytes": peak,
        "peak_growth_bytes": peak - mem_before,
        "peak_is_reset": peak_is_reset,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "others_cpu_share": others_share,
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


def wait_for_quiet(limit_s: float, threshold: float = 0.10) -> None:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` of the CPUs for 2 s running."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        probe = OthersLoad((resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)).start()
        time.sleep(2.0)
        share = probe.stop()
        if share is None or share < threshold:
            return


def spawn(args: argparse.Namespace, backbone: str, method: str, check: bool = False) -> dict[str, Any]:
    """Run one worker (a measurement, or with ``check`` the equivalence check) in a fresh process."""
    if args.wait_idle > 0 and not check:
        wait_for_quiet(args.wait_idle)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--backbone",
        backbone,
        "--method",
        method,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--r",
        str(args.r),
        "--alpha",
        str(args.alpha),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ] + (["--check"] if check else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        if check:
            sys.exit(
                f"error: equivalence check for {backbone} failed (exit {proc.returncode}): our LoRA and peft's "
                "do not compute the same thing, so timing them side by side would be meaningless; see above"
            )
        sys.exit(f"error: worker {backbone}/{method} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(lines[-1][len(RESULT_MARK) :])


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine repeats: the fastest median step/inference times (outside load only ever slows a run down)."""
    best = dict(min(runs, key=lambda r: r["step_s"]))
    for key in ("infer_s", "infer_merged_s"):
        values = [r[key] for r in runs if r[key] is not None]
        best[key] = min(values) if values else None
    best["step_min_s"] = min(r["step_min_s"] for r in runs)
    best["step_max_s"] = max(r["step_max_s"] for r in runs)
    best["repeat_step_s"] = [r["step_s"] for r in runs]
    return best


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "—"


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{1000 * s:.1f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


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
        f"| method | trainable params | trainable % | step (ms) | step / full FT | step / peft | infer (ms) "
        f"| infer / peft | infer merged (ms) | merged / peft | AdamW state (MiB) | {mem} growth (MiB) "
        f"| growth / full FT | {mem} (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in METHODS:
        r = res[key]
        cells = [
            LABELS[key],
            f"{r['trainable']:,}",
            f"{100 * r['trainable'] / full['trainable']:.2f}",
            _ms(r["step_s"]),
            _ratio(r["step_s"], full["step_s"]),
            _ratio(r["step_s"], peft["step_s"]),
            _ms(r["infer_s"]),
            _ratio(r["infer_s"], peft["infer_s"]),
            _ms(r["infer_merged_s"]),
            _ratio(r["infer_merged_s"], peft["infer_merged_s"]),
            _mib(r["opt_state_bytes"]),
            _mib(r["peak_growth_bytes"]),
            _ratio(r["peak_growth_bytes"], full["peak_growth_bytes"]),
            _mib(r["peak_bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"ours / peft: step {_ratio(ours['step_s'], peft['step_s'])}, "
        f"inference {_ratio(ours['infer_s'], peft['infer_s'])}"
        f" (merged {_ratio(ours['infer_merged_s'], peft['infer_merged_s'])}), {mem} growth "
        f"{_ratio(ours['peak_growth_bytes'], peft['peak_growth_bytes'])}. "
        f"LoRA / full FT step: ours {_ratio(ours['step_s'], full['step_s'])}, "
        f"peft {_ratio(peft['step_s'], full['step_s'])}; "
        f"{mem} growth: ours {_ratio(ours['peak_growth_bytes'], full['peak_growth_bytes'])}, "
        f"peft {_ratio(peft['peak_growth_bytes'], full['peak_growth_bytes'])}. "
        "Step range (min-max ms): "
        + ", ".join(f"{LABELS[k]} {_ms(res[k]['step_min_s'])}-{_ms(res[k]['step_max_s'])}" for k in METHODS)
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
            + "; ".join(f"{LABELS[k]} " + ", ".join(_ms(v) for v in res[k]["repeat_step_s"]) for k in METHODS)
            + "."
        )
    shares = {k: res[k]["others_cpu_share"] for k in METHODS}
    if all(v is not None for v in shares.values()):
        lines[-1] += (
            " Other processes' share of the CPUs during the training steps: "
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
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: before each measurement, wait up to this long for other processes to go quiet",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every method this many times, interleaved, and keep the fastest median",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=0,
        metavar="N",
        help="measure a (backbone, method) again, up to N times, when other processes used over "
        "10 %% of the CPUs during its timed steps; the fastest run is kept",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the cores available to us")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated subset of llama,vit")
    parser.add_argument("--markdown", metavar="PATH", help="also write the output to this file")
    # internal: one measurement in a fresh process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", choices=BACKBONES, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.noisy_retries < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup and --noisy-retries >= 0")
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbones or any(b not in BACKBONES for b in backbones):
        parser.error(f"--backbones must be a comma-separated subset of {','.join(BACKBONES)}")

    if importlib.util.find_spec("peft") is None:
        sys.exit("error: peft is not installed; this benchmark compares against it: pip install peft")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if args.threads <= 0:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)

    if args.worker:
        result = run_check(args) if args.check else run_worker(args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    start = time.perf_counter()
    load = OthersLoad((resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)).start()
    header = [
        f"# LoRA speed: full FT vs our LoRA vs peft LoRA ({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Device: {device_name(args.device)} ({args.device}, {args.threads} threads); torch {torch.__version__}, "
        f"peft {_version('peft')}, transformers {_version('transformers')}, timm {_version('timm')}; "
        f"python {platform.python_version()}. Size preset `{args.size}`, median of {args.steps} steps after "
        f"{args.warmup} warm-up; every (backbone, method) in a fresh process"
        + (f"; fastest of {args.repeats} interleaved repeats" if args.repeats > 1 else "")
        + (f"; up to {args.noisy_retries} re-runs of a disturbed measurement" if args.noisy_retries else "")
        + ".",
        "",
    ]
    print("\n".join(header), flush=True)
    out = list(header)
    for backbone in backbones:
        size = SIZES[args.size][backbone]
        check = spawn(args, backbone, "ours", check=True)
        runs: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
        for _ in range(args.repeats):  # interleaved, so a burst of outside load does not hit one method only
            for method in METHODS:
                runs[method].append(spawn(args, backbone, method))
                for _ in range(args.noisy_retries):  # a run disturbed by outside load is measured again
                    if (runs[method][-1]["others_cpu_share"] or 0.0) <= NOISY:
                        break
                    runs[method].append(spawn(args, backbone, method))
        res = {method: best_of(runs[method]) for method in METHODS}
        lines = table(backbone, size, res, check, args)
        print("\n".join(lines), flush=True)
        out += lines
    share = load.stop()
    footer = f"Total wall time {time.perf_counter() - start:.0f} s" + (
        "." if share is None else f"; other processes used {100 * share:.0f} % of the machine's CPU meanwhile."
    )
    print(footer)
    out.append(footer)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
