"""LISA memory and speed: full fine-tuning vs our LoRA vs LISA, one process and 2-process DDP, in one run.

Not a test (STYLE.md item 13). The benchmark LLM is a transformers ``LlamaForCausalLM`` built from a
``LlamaConfig`` with random weights (nothing is downloaded; default hidden 256, 8 layers,
intermediate 688, 4 heads, vocab 2048), trained on random token ids (default batch 8 x 128 tokens,
causal-LM loss) by a real ``lightning.Trainer`` with a small ``LightningModule`` whose
``configure_optimizers`` builds AdamW over the parameters that require grad. Five runs:

* ``full``: every parameter trainable, one process;
* ``lora``: the ``LoRA`` callback, r=8, alpha=16, on the preset targets (all 7 Llama projections);
* ``lisa``: the ``LISA`` callback, ``n_layers=2`` of the 8 blocks, a new draw every ``--interval``
  optimizer steps (several switches happen during the measured steps);
* ``lisa_ddp``: LISA on 2 processes, ``strategy="ddp_selective"``;
* ``full_ddp``: full fine-tuning on 2 processes, ``strategy="ddp"`` (the throughput reference);
* ``lora_ddp`` and ``lora_ddp_selective``: LoRA on 2 processes under torch DDP (``strategy="ddp"``, its
  bucketed all-reduce overlapping the backward) and under ``ddp_selective``: the same trainable set, so the
  ratio of their steps is the cost of ``ddp_selective``'s synchronisation against torch DDP's.

Each run is a fresh worker process (``harness.run_ranks``); under DDP Lightning relaunches that worker for
rank 1, and every rank reports its own figures.
Per run: median step time (``on_train_batch_start`` to ``on_train_batch_end`` of a timing callback,
``torch.cuda.synchronize()`` around it on CUDA) over ``--steps`` steps after ``--warmup``; trainable
parameters at the last step; bytes of the tensors in ``optimizer.state`` after the last step; and
peak memory, the largest over ranks. On CPU that is the process's RSS high-water mark (``VmHWM``),
reset (``/proc/self/clear_refs``) right before the model is built, minus the RSS at that moment: the
import baseline (python, torch, Lightning, transformers) is excluded. ``getrusage``'s ``ru_maxrss``
is not used where ``VmHWM`` exists: a process started by fork+exec inherits its parent's high-water
mark there, which would charge rank 1 with rank 0's model. On CUDA, ``torch.cuda.max_memory_allocated``
minus what was allocated before the model was built.

Threads: the cores available divided by the processes of the run (``OMP_NUM_THREADS`` and
``torch.set_num_threads``), e.g. 2 cores: 2 threads in one process, 1 per rank under DDP. Under DDP each
rank takes ``--batch`` samples per step (the global batch doubles), so throughput is compared in samples/s.
The issue's goals are printed with PASS/MISS and, under ``benchmarks/run_all.py``, recorded for its summary.

    python benchmarks/lisa_memory.py                                   # ~2 min on 2 idle CPU cores
    python benchmarks/lisa_memory.py --hidden 512 --batch 2 --seq 64   # weights, not activations, dominate
    python benchmarks/lisa_memory.py --steps 3 --warmup 1 --layers 4   # smoke check
    python benchmarks/lisa_memory.py --device cuda --markdown lisa_memory.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import cores, llama_config, others_share, rank_device, record  # noqa: E402  (benchmarks/ is on sys.path)
from harness import (  # noqa: E402
    NOISY,
    QUIET_TRAINER,
    PeakMemory,
    Report,
    StepTimer,
    add_common_args,
    markdown_table,
    measure_each,
    mib,
    optimizer_state_bytes,
    others_cell,
    parse_args,
    ratio,
    run_ranks,
    verdict,
)

SELECTIVE_GOAL = 1.05  # issue #15: ddp_selective step / torch DDP step on the same trainable set
RUNS = ("full", "lora", "lisa", "lisa_ddp", "full_ddp", "lora_ddp", "lora_ddp_selective")
SPEC: dict[str, dict[str, Any]] = {  # method, processes, Lightning strategy
    "full": {"method": "full", "procs": 1, "strategy": "auto", "label": "full FT"},
    "lora": {"method": "lora", "procs": 1, "strategy": "auto", "label": "LoRA r=8"},
    "lisa": {"method": "lisa", "procs": 1, "strategy": "auto", "label": "LISA"},
    "lisa_ddp": {"method": "lisa", "procs": 2, "strategy": "ddp_selective", "label": "LISA, DDP ddp_selective"},
    "full_ddp": {"method": "full", "procs": 2, "strategy": "ddp", "label": "full FT, DDP ddp"},
    "lora_ddp": {"method": "lora", "procs": 2, "strategy": "ddp", "label": "LoRA r=8, DDP ddp"},
    "lora_ddp_selective": {
        "method": "lora",
        "procs": 2,
        "strategy": "ddp_selective",
        "label": "LoRA r=8, DDP ddp_selective",
    },
}


# ----------------------------------------------------------------------------------------------- worker


def composition(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the parts that decide what LISA can save."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    inner = model.model
    return {
        "embed": count(inner.embed_tokens),
        "head": count(model.lm_head),
        "norm": count(inner.norm),
        "block": count(inner.layers[0]),
        "blocks": count(inner.layers),
        "n_blocks": len(inner.layers),
        "total": count(model),
        "tied": int(model.lm_head.weight is inner.embed_tokens.weight),
    }


def run_rank(args: argparse.Namespace) -> dict[str, Any]:
    """One run (``args.run``) in this fresh process, or under DDP one rank of it: its figures."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    from lightning_peft import LISA, LoRA
    from lightning_peft.strategies import SelectiveDDPStrategy  # importing it registers "ddp_selective"

    spec = SPEC[args.run]
    cuda = args.device == "cuda"
    device = rank_device(args.device)  # under DDP each rank has its own GPU
    procs, measured_from = spec["procs"], args.warmup
    max_steps = args.warmup + args.steps

    class Bench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(args.seed)
            self.model = LlamaForCausalLM(llama_config(vars(args)))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    timer = StepTimer(args.steps, args.warmup, device)
    per_step: dict[str, list[Any]] = {"mem": [], "opt_bytes": [], "trainable": [], "losses": []}

    class Timer(Callback):
        """Step wall time (and others' CPU load while timed); trainable set, optimizer state, memory after each step."""

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            torch.set_num_threads(args.threads)  # whatever a launcher set, the run's threads per process

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            timer.start()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            per_step["trainable"].append(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            timer.stop()
            per_step["mem"].append(memory.now())
            per_step["opt_bytes"].append(optimizer_state_bytes(trainer.optimizers[0]))
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            per_step["losses"].append(float(loss.detach()))

    # the data: random token ids, exactly what the steps consume (each rank gets its own share)
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, args.vocab, (args.batch * max_steps * procs, args.seq), generator=gen)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)

    memory = PeakMemory(device).start()
    module = Bench()
    comp = composition(module.model)
    callbacks: list[Callback] = [Timer()]  # first: its clock starts before LISA's switch in on_train_batch_start
    method_cb: Any = None
    if spec["method"] == "lora":
        method_cb = LoRA(r=args.r, alpha=args.alpha)
    elif spec["method"] == "lisa":
        method_cb = LISA(n_layers=args.n_layers, interval=args.interval, seed=args.seed)
    if method_cb is not None:
        callbacks.append(method_cb)
    if spec["method"] == "full":
        module.requires_grad_(True)
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=procs,
        strategy=spec["strategy"],
        max_steps=max_steps,
        callbacks=callbacks,
        **QUIET_TRAINER,
    )
    reduce_times: list[float] = []
    if isinstance(trainer.strategy, SelectiveDDPStrategy):  # time its all-reduce (it runs inside every step)
        strategy, original = trainer.strategy, trainer.strategy.reduce_gradients

        def timed_reduce(optimizer: torch.optim.Optimizer) -> int:
            t0 = time.perf_counter()
            n = original(optimizer)
            reduce_times.append(time.perf_counter() - t0)
            return n

        strategy.reduce_gradients = timed_reduce  # type: ignore[method-assign]
    trainer.fit(module, train_dataloaders=loader)
    timed = timer.result()
    return {
        "run": args.run,
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "threads": torch.get_num_threads(),
        "strategy": type(trainer.strategy).__name__,
        "steps_done": trainer.global_step,
        "step_times_s": timed["step_times_s"],
        "step_s": timed["step_s"],
        "trainable_per_step": per_step["trainable"],
        "trainable": per_step["trainable"][-1],
        "total": comp["total"],
        "composition": comp,
        "opt_state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
        "opt_state_per_step": per_step["opt_bytes"],
        "mem_per_step": per_step["mem"],
        **memory.figures(),
        "losses": per_step["losses"],
        "window": timed["others_window"],
        "lisa_history": [[s, list(a)] for s, a in method_cb.history] if isinstance(method_cb, LISA) else None,
        "lora_layers": len(method_cb.adapted) if isinstance(method_cb, LoRA) else None,
        "reduce_s": statistics.median(reduce_times[measured_from:]) if reduce_times[measured_from:] else None,
    }


# ----------------------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, run: str) -> dict[str, Any]:
    """Run ``run`` in a fresh worker process; combine its ranks' figures."""
    procs = SPEC[run]["procs"]
    threads = max(1, cores() // procs)
    spec = vars(args) | {"run": run, "threads": threads}
    ranks = run_ranks(run_rank, spec, procs, threads=threads, timeout=args.timeout, label=run)
    res = dict(ranks[0])
    res["procs"] = procs
    res["threads"] = threads
    res["threads_seen"] = sorted({r["threads"] for r in ranks})  # what torch used inside fit, every rank
    res["peak_growth_bytes"] = max(r["peak_growth_bytes"] for r in ranks)
    res["peak_bytes"] = max(r["peak_bytes"] for r in ranks)
    res["rank_growth_bytes"] = [r["peak_growth_bytes"] for r in ranks]
    res["step_s"] = max(r["step_s"] for r in ranks)  # ranks wait for each other at every all-reduce
    res["samples_per_s"] = procs * args.batch / res["step_s"]
    res["opt_state_bytes_ranks"] = [r["opt_state_bytes"] for r in ranks]
    reduce = [r["reduce_s"] for r in ranks if r.get("reduce_s") is not None]
    res["reduce_s"] = max(reduce) if reduce else None
    res["others_cpu_share"] = others_share([r["window"] for r in ranks])  # the ranks' own CPU is not "others"
    return res


def _goal(value: float | None, limit: float) -> str:
    return verdict(None if value is None else value <= limit)


def report(args: argparse.Namespace, res: dict[str, dict[str, Any]], out: Report) -> None:
    cuda = args.device == "cuda"
    mem = "CUDA alloc" if cuda else "RSS"
    full, lora, lisa = res["full"], res["lora"], res["lisa"]
    comp = full["composition"]
    always = comp["embed"] + (0 if comp["tied"] else comp["head"]) + comp["norm"]
    lisa_expect = always + args.n_layers * comp["block"]
    single_threads = res["full"]["threads"]
    ddp_threads = res["lisa_ddp"]["threads"] if "lisa_ddp" in res else None
    out.header(
        "### LISA memory: full FT vs LoRA vs LISA, 1 process and 2-process DDP", packages=("lightning", "transformers")
    )
    lines = [
        f"Model: LlamaForCausalLM, random weights, hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens per "
        f"process, causal-LM loss, AdamW (lr 1e-4, fp32). Median of {args.steps} steps after {args.warmup} warm-up; "
        f"every run in a fresh process. Threads: {single_threads} in one process"
        + (f", {ddp_threads} per rank under DDP" if ddp_threads else "")
        + f" (cores / processes). LoRA r={args.r}, alpha={args.alpha:g} on {lora['lora_layers']} layers "
        f"(the preset: all 7 projections of every block). LISA n_layers={args.n_layers} of {comp['n_blocks']}, "
        f"interval {args.interval}: draws {', '.join(f'{s}:{a}' for s, a in lisa['lisa_history'])} (first step: "
        "blocks).",
        "",
        f"Parameter composition: embeddings {comp['embed']:,} + head {comp['head']:,}"
        + (" (tied to the embeddings)" if comp["tied"] else "")
        + f" + final norm {comp['norm']:,} = {always:,} always-on ({100 * always / comp['total']:.1f} %); one block "
        f"{comp['block']:,} ({100 * comp['block'] / comp['total']:.1f} %); all {comp['n_blocks']} blocks "
        f"{comp['blocks']:,} ({100 * comp['blocks'] / comp['total']:.1f} %); total {comp['total']:,}. LISA trains "
        f"always-on + {args.n_layers} blocks = {lisa_expect:,} ({100 * lisa_expect / comp['total']:.1f} %), so its "
        f"AdamW state should be {mib(8 * lisa_expect)} MiB (2 fp32 moments), against {mib(8 * comp['total'])} MiB "
        "for full FT.",
        "",
        f"Memory: **peak {mem} growth** = peak {mem} minus the {mem} right before the model was built "
        + (
            "(CUDA: `max_memory_allocated`)"
            if cuda
            else "(the import baseline of python/torch/Lightning/transformers is excluded; the high-water mark "
            "`VmHWM` is reset at that moment)"
        )
        + "; under DDP the largest over ranks. **All memory ratios use the growth.** *est. static* = 4 bytes x "
        "(all parameters + trainable parameters) + the measured AdamW state: weights, gradients and optimizer "
        "state; the rest of the growth is activations, temporaries and allocator slack.",
        "",
    ]
    columns = ["run", "procs x threads", "trainable params", "trainable %", "AdamW state (MiB)", "est. static (MiB)"]
    columns += [f"peak {mem} growth (MiB)", "growth / full FT", f"peak {mem} raw (MiB)", "step (ms)", "step / full FT"]
    rows = []
    for run in RUNS:
        if run not in res:
            continue
        r = res[run]
        total = r["total"] + (r["trainable"] if r["trainable"] > 0 and run.startswith("lora") else 0)
        static = 4 * (total + r["trainable"]) + r["opt_state_bytes"]
        rows.append(
            [
                SPEC[run]["label"],
                f"{r['procs']} x {r['threads']}",
                f"{r['trainable']:,}",
                f"{100 * r['trainable'] / r['total']:.1f}",
                mib(r["opt_state_bytes"]),
                mib(static),
                mib(r["peak_growth_bytes"]),
                ratio(r["peak_growth_bytes"], full["peak_growth_bytes"]),
                mib(r["peak_bytes"]),
                f"{1000 * r['step_s']:.1f}",
                ratio(r["step_s"], full["step_s"]),
                f"{r['samples_per_s']:.1f}",
                others_cell(r["others_cpu_share"]),
            ]
        )
    lines += markdown_table([*columns, "samples/s", "others' CPU"], rows, left=2)

    g_full = lisa["peak_growth_bytes"] / full["peak_growth_bytes"]
    g_lora = lisa["peak_growth_bytes"] / lora["peak_growth_bytes"]
    g_ddp = res["lisa_ddp"]["peak_growth_bytes"] / lisa["peak_growth_bytes"] if "lisa_ddp" in res else None
    g_step = lisa["step_s"] / full["step_s"]
    record("lisa_memory", "LISA peak growth / full FT", g_full, "<= 0.5", g_full <= 0.5)
    record("lisa_memory", "LISA peak growth / LoRA", g_lora, "<= 1.15", g_lora <= 1.15)
    if g_ddp is not None:
        record("lisa_memory", "LISA DDP per-rank peak / 1 process", g_ddp, "<= 1.2", g_ddp <= 1.2)
    record("lisa_memory", "LISA step / full FT step", g_step, "<= 1.0", g_step <= 1.0)
    scale = {
        run: res[f"{run}_ddp"]["samples_per_s"] / res[run]["samples_per_s"]
        for run in ("lisa", "full")
        if f"{run}_ddp" in res
    }
    lines += [
        "",
        "Goals (issue #4), ratios from this run:",
        "",
        "| goal | measured | result |",
        "|---|---:|---|",
        f"| LISA peak growth <= 0.5 x full FT | {g_full:.3f} x | {_goal(g_full, 0.5)} |",
        f"| LISA peak growth <= 1.15 x LoRA | {g_lora:.3f} x | {_goal(g_lora, 1.15)} |",
        "| DDP LISA per-rank peak growth <= 1.2 x 1-process LISA | "
        + ("—" if g_ddp is None else f"{g_ddp:.3f} x")
        + f" | {_goal(g_ddp, 1.2)} |",
        f"| LISA step time <= full FT step time (1 process) | {g_step:.3f} x | {_goal(g_step, 1.0)} |",
    ]
    name = "lisa_memory"
    record(name, "LISA peak memory / full FT", g_full, "<= 0.5", g_full <= 0.5)
    record(name, "LISA peak memory / LoRA", g_lora, "<= 1.15", g_lora <= 1.15)
    if g_ddp is not None:
        record(name, "DDP LISA per-rank peak / 1-process LISA", g_ddp, "<= 1.2", g_ddp <= 1.2)
    record(name, "LISA step / full FT step (1 process)", g_step, "<= 1.0", g_step <= 1.0)
    for run, value in scale.items():
        record(name, f"{SPEC[run]['label']}: DDP 2-process / 1-process samples/s", value)
        lines.append(
            f"| {SPEC[run]['label']}: DDP 2-process / 1-process samples/s | {value:.3f} x | reported (no threshold) |"
        )
    lines += [""]
    notes = []
    if "lisa_ddp" in res and "full_ddp" in res:
        notes.append(f"DDP scaling LISA (ddp_selective) / full FT (ddp): {scale['lisa'] / scale['full']:.3f}.")
    if "lora_ddp" in res and "lora_ddp_selective" in res:
        selective = res["lora_ddp_selective"]["step_s"] / res["lora_ddp"]["step_s"]
        notes.append(
            f"Same trainable set (LoRA r=8), 2 processes: ddp_selective step / torch DDP step = {selective:.3f} "
            f"(goal <= {SELECTIVE_GOAL}): **{verdict(selective <= SELECTIVE_GOAL)}**."
        )
    if res.get("lisa_ddp", {}).get("reduce_s") is not None:
        r = res["lisa_ddp"]
        notes.append(
            f"ddp_selective's all-reduce of the trainable gradients ({mib(4 * r['trainable'])} MiB): "
            f"{1000 * r['reduce_s']:.1f} ms per step (median, slowest rank, includes waiting for the other rank) = "
            f"{100 * r['reduce_s'] / r['step_s']:.0f} % of the step; it does not overlap the backward pass."
        )
    expect_bytes = 8 * lisa_expect
    notes.append(
        f"LISA AdamW state after the last step {mib(lisa['opt_state_bytes'])} MiB vs expected "
        f"{mib(expect_bytes)} MiB (+ step counters); per step (MiB): "
        + ", ".join(mib(b) for b in lisa["opt_state_per_step"])
        + "."
    )
    for run in ("lisa", "lisa_ddp", "full", "lora"):
        if run in res:
            per = res[run]["mem_per_step"]
            notes.append(
                f"{SPEC[run]['label']}: {mem} after each step (MiB, rank 0): "
                + ", ".join(f"{b / 2**20:.0f}" for b in per)
                + "."
            )
    if "lisa_ddp" in res:
        notes.append(
            "DDP per-rank peak growth (MiB): LISA "
            + ", ".join(mib(b) for b in res["lisa_ddp"]["rank_growth_bytes"])
            + (
                "; full FT " + ", ".join(mib(b) for b in res["full_ddp"]["rank_growth_bytes"])
                if "full_ddp" in res
                else ""
            )
            + "."
        )
    else:
        notes.append("DDP runs skipped (" + ("--no-ddp" if args.no_ddp else "fewer than 2 GPUs") + ").")
    ranges = []
    for run in RUNS:
        if run in res:
            times = res[run]["step_times_s"]
            ranges.append(f"{SPEC[run]['label']} {1000 * min(times):.0f}-{1000 * max(times):.0f}")
    notes.append("Step range (min-max ms): " + ", ".join(ranges) + ".")
    disturbed = [SPEC[run]["label"] for run in RUNS if run in res and (res[run]["others_cpu_share"] or 0) > NOISY]
    if disturbed:
        notes.append(
            f"**Disturbed**: other processes used over {100 * NOISY:.0f} % of the CPUs while "
            f"{', '.join(disturbed)} ran; their step times are inflated (memory is not affected)."
        )
    odd = [
        f"{SPEC[run]['label']} {res[run]['threads_seen']}"
        for run in RUNS
        if run in res
        if args.device == "cpu" and res[run]["threads_seen"] != [res[run]["threads"]]
    ]
    if odd:
        notes.append("**Warning**: torch used other thread counts than set: " + ", ".join(odd) + ".")
    out.print(lines + notes + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=0, help="0: hidden x 2.6875 (688 for hidden 256)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="samples per process and step")
    parser.add_argument("--seq", type=int, default=128)
    add_common_args(parser, steps=10, warmup=2, threads=None)  # threads: the cores divided by the run's processes
    parser.add_argument("--interval", type=int, default=3, help="LISA: optimizer steps between draws")
    parser.add_argument("--n-layers", type=int, default=2, help="LISA: blocks trained at a time")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process runs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    args = parse_args(parser)
    if args.intermediate <= 0:
        args.intermediate = round(args.hidden * 2.6875)
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")

    runs = [r for r in RUNS if SPEC[r]["procs"] == 1 or not args.no_ddp]
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        runs = [r for r in runs if SPEC[r]["procs"] == 1]
    out = Report(args)
    report(args, measure_each(runs, lambda run: spawn(args, run), args), out)
    out.close()


if __name__ == "__main__":
    main()
