"""Per-rank memory and step time of every method under 2-process FSDP2 vs the same method under 2-process DDP.

Not a test (STYLE.md item 13). The model is a transformers ``LlamaForCausalLM`` with random weights built from a
``LlamaConfig`` (nothing downloaded), trained on random token ids by a real ``lightning.Trainer``. Two
configurations:

* ``bench``: the benchmark Llama of ``lisa_memory.py`` / ``sparse_memory.py`` (hidden 256, 8 layers, batch 8 x 128
  tokens): activations weigh as much as the weights;
* ``weights``: hidden 1024, 12 layers, intermediate 2816, vocab 4096, batch 1 x 64: the weights dominate, which is
  where sharding pays (the weights, and the optimizer state of what trains, are halved; activations are not);
* ``deep``: the same with 24 layers (``--configs deep``, not run by default): FSDP2 holds one or two gathered blocks
  beyond each rank's shard, a share of the weights that shrinks as blocks get more numerous.

For each method (``LoRA`` r=8 on the 7 projections, ``AdaLoRA`` 12 -> 8, ``LISA`` 2 of the blocks every 2 steps,
``ID3`` and ``SaRA`` with LoRA r=8's parameter count as budget) two runs of 2 processes: ``fsdp2``
(``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``lightning_peft.shard`` in
``configure_model``) and ``ddp`` (``strategy="ddp"`` for LoRA/AdaLoRA, ``"ddp_selective"`` for the methods whose
trainable set changes, which refuse plain DDP). Every run is a fresh worker process (``harness.run_ranks``); each
rank reports its figures.

Per rank: the RSS high-water mark during training (``VmHWM``, reset by ``/proc/self/clear_refs`` in ``on_train_start``,
after the model was built and sharded and freed heap returned to the OS with ``malloc_trim``) minus the RSS right
before the model was built (the import baseline is excluded), the largest over the ranks; and the median step time
over ``--steps`` steps after ``--warmup``. On CUDA, ``torch.cuda.max_memory_allocated`` from ``on_train_start``.
Every rank builds the whole model before ``configure_model`` shards it (as ``from_pretrained`` does); on a GPU that
happens on the CPU, so the training peak is the figure that decides what fits on the device. The table
gives FSDP2 / DDP ratios; the issue's goal (weights configuration: FSDP2 per-rank peak <= 0.65 x DDP's) is printed
with PASS/MISS. A method that is refused under a strategy is reported as such, with the reason.

    python benchmarks/fsdp2_memory.py                      # both configurations, every method (~10 min, 2 idle cores)
    python benchmarks/fsdp2_memory.py --configs weights --methods lora adalora --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import cores, llama_config, rank_device, record  # noqa: E402  (benchmarks/ is on sys.path)
from harness import (  # noqa: E402
    QUIET_TRAINER,
    PeakMemory,
    Report,
    StepTimer,
    WorkerFailed,
    add_common_args,
    markdown_table,
    measure_each,
    mib,
    parse_args,
    run_ranks,
)

METHODS = ("lora", "adalora", "lisa", "id3", "sara")
STRATEGIES = ("fsdp2", "ddp")
CONFIGS: dict[str, dict[str, int]] = {
    "bench": {"hidden": 256, "layers": 8, "intermediate": 688, "heads": 4, "vocab": 2048, "batch": 8, "seq": 128},
    "weights": {"hidden": 1024, "layers": 12, "intermediate": 2816, "heads": 8, "vocab": 4096, "batch": 1, "seq": 64},
    "deep": {"hidden": 1024, "layers": 24, "intermediate": 2816, "heads": 8, "vocab": 4096, "batch": 1, "seq": 64},
}
GOAL = 0.65  # FSDP2 per-rank peak / DDP per-rank peak, weights configuration
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_count(cfg: dict[str, int], r: int = 8) -> int:
    """Parameters of LoRA r=8 on the 7 projections: the budget of ID3 and SaRA."""
    h, i = cfg["hidden"], cfg["intermediate"]
    per_layer = 4 * r * (h + h) + 2 * r * (h + i) + r * (i + h)
    return per_layer * cfg["layers"]


def make_callback(method: str, cfg: dict[str, int]) -> Any:
    from lightning_peft import ID3, LISA, AdaLoRA, LoRA, SaRA

    if method == "lora":
        return LoRA(r=8, alpha=16)
    if method == "adalora":
        return AdaLoRA(r=12, target_r=8, tinit=1, tfinal=1, deltaT=1)
    if method == "lisa":
        return LISA(n_layers=2, interval=2)
    targeted = cfg["layers"] * (4 * cfg["hidden"] ** 2 + 3 * cfg["hidden"] * cfg["intermediate"])
    if method == "id3":
        return ID3(budget=lora_count(cfg), target_modules=TARGETS)
    return SaRA(fraction=lora_count(cfg) / targeted, target_modules=TARGETS)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so RSS shows what is live; no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_rank(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of one run (``args.config``, ``args.method``, ``args.strategy``): its figures."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    import lightning_peft
    from lightning_peft.strategies import SelectiveDDPStrategy  # noqa: F401  (registers "ddp_selective")

    cfg = CONFIGS[args.config]
    device = rank_device(args.device)
    max_steps = args.warmup + args.steps

    class Bench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(llama_config(cfg))

        def configure_model(self) -> None:
            if self.device_mesh is not None and not lightning_peft.distributed.is_sharded(self.model):
                lightning_peft.shard(self.model, self.device_mesh)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    timer = StepTimer(args.steps, args.warmup, device)

    class Timer(Callback):
        def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
            torch.set_num_threads(args.threads)

        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            # the model is built (whole, on every rank) and sharded: give what was freed back to the OS, then measure
            # the training peak from here (on a GPU the whole model never lands on the device: it is sharded on CPU)
            gc.collect()
            trim_heap()
            memory.reset()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            timer.stop()

    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg["vocab"], (cfg["batch"] * max_steps * 2, cfg["seq"]), generator=gen)
    loader = DataLoader(data, batch_size=cfg["batch"], shuffle=False)

    memory = PeakMemory(device).start()
    module = Bench()
    callbacks = [Timer(), make_callback(args.method, cfg)]
    if args.strategy == "fsdp2":
        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp" if args.method in ("lora", "adalora") else "ddp_selective"
    trainer = pl.Trainer(
        accelerator="cuda" if args.device == "cuda" else "cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        **QUIET_TRAINER,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    except (NotImplementedError, ValueError) as err:  # refused before training: report it
        return {"refused": f"{type(err).__name__}: {str(err)[:300]}"}
    return {
        "step_s": timer.result()["step_s"],
        "peak_growth_bytes": memory.figures()["peak_growth_bytes"],
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def spawn(args: argparse.Namespace, config: str, method: str, strategy: str) -> dict[str, Any]:
    threads = max(1, cores() // 2)
    spec = vars(args) | {"config": config, "method": method, "strategy": strategy, "threads": threads}
    # Every tensor of 64 KiB or more gets its own mapping, returned to the OS when freed (glibc): RSS then follows
    # the live tensors, as a GPU's allocated bytes do. Otherwise the heap keeps what FSDP2's per-block gathers
    # freed, and RSS shows every block's gathered weights at once.
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(64 << 10))}
    try:
        ranks = run_ranks(run_rank, spec, 2, threads=threads, env=env, timeout=args.timeout)
    except WorkerFailed as err:
        if not err.results:
            return {"error": f"exit {err.returncode}: {err.output[-400:].strip()}"}
        ranks = err.results
    if any("refused" in r for r in ranks):
        return {"refused": next(r["refused"] for r in ranks if "refused" in r)}
    return {
        "peak_growth_bytes": max(r["peak_growth_bytes"] for r in ranks),
        "step_s": max(r["step_s"] for r in ranks),  # ranks wait for each other
        "trainable": ranks[0]["trainable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["bench", "weights"], choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_common_args(parser, steps=4, warmup=2, device="cpu", threads=None, retries=False)
    parser.add_argument("--timeout", type=int, default=900)
    args = parse_args(parser)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("error: --device cuda needs 2 GPUs")
    report = Report(args)
    report.header(
        "### fsdp2_memory: 2-process FSDP2 vs 2-process DDP, per rank",
        packages=("lightning", "transformers"),
        details=f"{args.warmup} warm-up + {args.steps} measured steps; every run a fresh pair of processes.",
    )
    runs = [(c, m, s) for c in args.configs for m in args.methods for s in STRATEGIES]
    results = measure_each(runs, lambda run: spawn(args, *run), args, combine=lambda tries: tries[-1])
    columns = ["config", "method", "DDP peak/rank MiB", "FSDP2 peak/rank MiB", "FSDP2/DDP memory", "DDP step s"]
    rows = []
    for config in args.configs:
        for method in args.methods:
            ddp, fsdp = results[config, method, "ddp"], results[config, method, "fsdp2"]
            if "peak_growth_bytes" not in ddp or "peak_growth_bytes" not in fsdp:
                why = fsdp.get("refused") or fsdp.get("error") or ddp.get("refused") or ddp.get("error")
                rows.append([config, method, mib(ddp.get("peak_growth_bytes"), ",.0f"), "—", "—", "—", "—"])
                rows[-1].append(" ".join(str(why).split()).replace("|", "/"))
                continue
            mem = fsdp["peak_growth_bytes"] / ddp["peak_growth_bytes"]
            tim = fsdp["step_s"] / ddp["step_s"]
            goal = ""
            if config == "weights":
                met = mem <= GOAL
                goal = f" ({'PASS' if met else 'MISS'} <= {GOAL})"
                record("fsdp2_memory", f"{method} FSDP2/DDP per-rank peak (weights)", mem, f"<= {GOAL}", met)
            rows.append(
                [
                    config,
                    method,
                    mib(ddp["peak_growth_bytes"], ",.0f"),
                    mib(fsdp["peak_growth_bytes"], ",.0f"),
                    f"{mem:.3f}{goal}",
                    f"{ddp['step_s']:.3f}",
                    f"{fsdp['step_s']:.3f}",
                    f"{tim:.2f}",
                ]
            )
    report.print(markdown_table([*columns, "FSDP2 step s", "FSDP2/DDP time"], rows, left=2) + [""])
    report.close()


if __name__ == "__main__":
    main()
