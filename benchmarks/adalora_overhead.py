"""AdaLoRA's per-step cost: our allocator vs our LoRA at the same rank vs peft's AdaLoRA, in one run.

Not a test. A Llama-style causal LM (default hidden 256 x 8 layers, batch 8 x 128 tokens, all
linear layers adapted, 2 threads) is trained for a few steps three ways, with the same data:

* ``lora``: our LoRA at AdaLoRA's initial rank (the floor: same forward/backward shapes);
* ``ours``: our AdaLoRA exactly as the callback drives it (orthogonal-regulariser gradient, importance
  EMAs before ``optimizer.step``, masking after it);
* ``peft``: peft's AdaLoRA with its own loop (regulariser inside ``forward`` via ``labels``,
  ``update_and_allocate`` after ``optimizer.step``).

It prints median step times, the allocator's own time per step (regulariser + importance + masking)
and its share of the step, with ratios against the peers measured in the same run.

    python benchmarks/adalora_overhead.py            # default size
    python benchmarks/adalora_overhead.py --tiny     # seconds, for a smoke check
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import llama_config, record  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from harness import (  # noqa: E402
    Report,
    StepTimer,
    add_common_args,
    markdown_table,
    measure_each,
    measure_steps,
    others_cell,
    parse_args,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LABELS = {"lora": "our LoRA (r = init_r)", "ours": "our AdaLoRA", "peft": "peft AdaLoRA"}


def build(args: argparse.Namespace, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, args.hidden // 64)
    size = {"vocab": 2048, "hidden": args.hidden, "intermediate": int(args.hidden * 2.75), "layers": args.layers}
    return LlamaForCausalLM(llama_config(size | {"heads": heads, "seq": args.seq}))


def timed(step: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``step`` timed over the run's steps; ``alloc_s``: the median of its ``alloc`` laps (0 without any)."""
    result = measure_steps(step, args.steps, args.warmup, device)
    return result | {"alloc_s": result["phases_s"].get("alloc", 0.0)}


def run_ours(kind: str, args: argparse.Namespace, data: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers, inject_adapters
    from lightning_peft.methods.adalora import RankAllocator

    model = build(args).to(device)
    total = args.warmup + args.steps
    if kind == "lora":
        inject_adapters(model, LoRAConfig(r=args.init_r, alpha=16, target_modules=TARGETS))
        alloc = None
    else:
        cfg = AdaLoRAConfig(
            r=args.init_r,
            target_r=args.target_r,
            alpha=16,
            target_modules=TARGETS,
            tinit=1,
            tfinal=1,
            deltaT=1,
            total_step=total,
        )
        inject_adapters(model, cfg)
        alloc = RankAllocator(list(adapter_layers(model)), cfg, total_step=total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int, timer: StepTimer) -> None:
        loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        if alloc is not None:
            timer.lap("train")
            alloc.add_orthogonal_grad()
            if alloc.wants_importance(i):
                alloc.update_importance()
            timer.lap("alloc")
        opt.step()
        if alloc is not None:
            timer.lap("train")
            alloc.allocate(i)
            timer.lap("alloc")
        opt.zero_grad(set_to_none=True)

    return timed(step, args, device)


def run_peft(args: argparse.Namespace, data: list[torch.Tensor], device: torch.device) -> dict[str, Any]:
    import peft

    total = args.warmup + args.steps
    model = peft.get_peft_model(
        build(args),
        peft.AdaLoraConfig(
            init_r=args.init_r,
            target_r=args.target_r,
            lora_alpha=16,
            target_modules=TARGETS,
            tinit=1,
            tfinal=1,
            deltaT=1,
            total_step=total,
            lora_dropout=0.0,
        ),
    ).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int, timer: StepTimer) -> None:
        loss = model(input_ids=data[i], labels=data[i]).loss  # includes peft's orthogonal regulariser
        loss.backward()
        opt.step()
        timer.lap("train")
        model.base_model.update_and_allocate(i)
        timer.lap("alloc")
        opt.zero_grad(set_to_none=True)

    return timed(step, args, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=10, warmup=3, threads=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = parse_args(parser)
    if args.tiny:
        args.hidden, args.layers, args.batch, args.seq, args.steps, args.warmup = 64, 2, 2, 32, 4, 1
    try:
        import peft  # noqa: F401
    except ImportError:
        sys.exit("peft is not installed: pip install 'lightning-peft[peft]' (the comparison needs it)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.randint(0, 2048, (args.batch, args.seq), generator=gen).to(device)
        for _ in range(args.warmup + args.steps)
    ]

    report = Report(args)
    report.header(
        "# AdaLoRA step cost",
        packages=("peft", "transformers"),
        details=f"Llama hidden {args.hidden} x {args.layers} layers, batch {args.batch} x {args.seq}, init_r "
        f"{args.init_r}, all 7 linear kinds adapted, median of {args.steps} steps after {args.warmup} warm-up, "
        "all in this process.",
    )
    runs = {
        "lora": lambda: run_ours("lora", args, data, device),
        "ours": lambda: run_ours("adalora", args, data, device),
        "peft": lambda: run_peft(args, data, device),
    }
    results = measure_each(runs, lambda key: runs[key](), args)
    rows = []
    for key, r in results.items():
        share = r["alloc_s"] / r["step_s"] if r["step_s"] else 0.0
        rows.append(
            [
                LABELS[key],
                f"{1000 * r['step_s']:.1f}",
                f"{1000 * r['alloc_s']:.2f}",
                f"{100 * share:.2f} %",
                f"{r['step_s'] / results['lora']['step_s']:.3f}",
            ]
        )
    ours, peft_r, lora = results["ours"], results["peft"], results["lora"]
    ratio = ours["alloc_s"] / peft_r["alloc_s"] if peft_r["alloc_s"] else float("nan")
    others = ", ".join(f"{LABELS[k]} {others_cell(r['others_cpu_share'])}" for k, r in results.items())
    report.print(
        markdown_table(["run", "step (ms)", "allocator (ms)", "allocator share", "step vs our LoRA"], rows)
        + [
            "",
            f"our allocator time / peft's: {ratio:.3f}; our AdaLoRA step / peft's: "
            f"{ours['step_s'] / peft_r['step_s']:.3f}. Other processes' share of the CPUs during the timed steps: "
            f"{others}.",
            "",
        ]
    )
    share = ours["alloc_s"] / ours["step_s"] if ours["step_s"] else float("nan")
    record("adalora_overhead", "AdaLoRA allocator share of a step", share, "<= 0.02", share <= 0.02)
    record("adalora_overhead", "AdaLoRA step / our LoRA step", ours["step_s"] / lora["step_s"])
    record("adalora_overhead", "our allocator time / peft's", ratio)
    record("adalora_overhead", "our AdaLoRA step / peft's", ours["step_s"] / peft_r["step_s"])
    report.close()


if __name__ == "__main__":
    main()
