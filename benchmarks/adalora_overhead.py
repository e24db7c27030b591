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
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import record  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(kind: str, args: argparse.Namespace, data: list[torch.Tensor], device: torch.device) -> dict:
    from lightning_peft.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers, inject_adapters
    from lightning_peft.methods.adalora import RankAllocator

    model = build(args.hidden, args.layers).to(device)
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
    steps, alloc_times = [], []
    for step, ids in enumerate(data[:total]):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t_alloc = 0.0
        if alloc is not None:
            sync(device)
            a0 = time.perf_counter()
            alloc.add_orthogonal_grad()
            if alloc.wants_importance(step):
                alloc.update_importance()
            sync(device)
            t_alloc += time.perf_counter() - a0
        opt.step()
        if alloc is not None:
            sync(device)
            a0 = time.perf_counter()
            alloc.allocate(step)
            sync(device)
            t_alloc += time.perf_counter() - a0
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            steps.append(time.perf_counter() - t0)
            alloc_times.append(t_alloc)
    return {"step": statistics.median(steps), "alloc": statistics.median(alloc_times) if alloc else 0.0}


def run_peft(args: argparse.Namespace, data: list[torch.Tensor], device: torch.device) -> dict:
    import peft

    total = args.warmup + args.steps
    model = peft.get_peft_model(
        build(args.hidden, args.layers),
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
    steps, alloc_times = [], []
    for step, ids in enumerate(data[:total]):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss  # includes peft's orthogonal regulariser
        loss.backward()
        opt.step()
        sync(device)
        a0 = time.perf_counter()
        model.base_model.update_and_allocate(step)
        sync(device)
        a1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            steps.append(time.perf_counter() - t0)
            alloc_times.append(a1 - a0)
    return {"step": statistics.median(steps), "alloc": statistics.median(alloc_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.layers, args.batch, args.seq, args.steps, args.warmup = 64, 2, 2, 32, 4, 1
    try:
        import peft  # noqa: F401
    except ImportError:
        sys.exit("peft is not installed: pip install 'lightning-peft[peft]' (the comparison needs it)")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.randint(0, 2048, (args.batch, args.seq), generator=gen).to(device)
        for _ in range(args.warmup + args.steps)
    ]

    results = {
        "lora": run_ours("lora", args, data, device),
        "ours": run_ours("adalora", args, data, device),
        "peft": run_peft(args, data, device),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"AdaLoRA step cost, {datetime.date.today()}, {name} ({device.type}, {args.threads} threads), torch "
        f"{torch.__version__}; Llama hidden {args.hidden} x {args.layers} layers, batch {args.batch} x {args.seq}, "
        f"init_r {args.init_r}, all 7 linear kinds adapted, median of {args.steps} steps after {args.warmup} warm-up",
        "",
        "| run | step (ms) | allocator (ms) | allocator share | step vs our LoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("lora", "our LoRA (r = init_r)"), ("ours", "our AdaLoRA"), ("peft", "peft AdaLoRA")):
        r = results[key]
        share = r["alloc"] / r["step"] if r["step"] else 0.0
        lines.append(
            f"| {label} | {1000 * r['step']:.1f} | {1000 * r['alloc']:.2f} | {100 * share:.2f} % | "
            f"{r['step'] / results['lora']['step']:.3f} |"
        )
    ratio = results["ours"]["alloc"] / results["peft"]["alloc"] if results["peft"]["alloc"] else float("nan")
    lines += [
        "",
        f"our allocator time / peft's: {ratio:.3f}; our AdaLoRA step / peft's: "
        f"{results['ours']['step'] / results['peft']['step']:.3f}",
    ]
    share = results["ours"]["alloc"] / results["ours"]["step"] if results["ours"]["step"] else float("nan")
    record("adalora_overhead", "AdaLoRA allocator share of a step", share, "<= 0.02", share <= 0.02)
    record("adalora_overhead", "AdaLoRA step / our LoRA step", results["ours"]["step"] / results["lora"]["step"])
    record("adalora_overhead", "our allocator time / peft's", ratio)
    record("adalora_overhead", "our AdaLoRA step / peft's", results["ours"]["step"] / results["peft"]["step"])
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
