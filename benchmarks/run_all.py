"""Run every per-method benchmark and print one table of the headline ratios, measured in the same run.

Not a test. Each benchmark runs as its own script (so each keeps its fresh-process measurements)
with ``LIGHTNING_PEFT_BENCH_SUMMARY`` pointing at a JSON-lines file where it records its headline
figures (:func:`common.record`): our LoRA / peft LoRA, AdaLoRA's allocator share and its ratios to
LoRA and peft, LISA / full FT / LoRA memory and the DDP throughput ratios, ID³ and SaRA memory and
optimizer-state bytes. The summary table lists every figure with its goal and PASS/MISS where the
issue set one; ``--markdown`` writes it (with the machine and date, and each benchmark's own full
output below) for the README to quote. The same command runs on CUDA (``--device cuda``).

    python benchmarks/run_all.py --markdown benchmarks/RESULTS.md     # ~20 min on 2 CPU cores
    python benchmarks/run_all.py --quick                              # a few minutes: smoke sizes
    python benchmarks/run_all.py --only lisa_memory,sparse_memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ENV, device_name  # noqa: E402

# (name, arguments at full size, arguments for --quick)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("lora_speed", ["--size", "small"], ["--size", "tiny", "--steps", "3", "--warmup", "1"]),
    ("adalora_overhead", [], ["--tiny"]),
    ("lisa_memory", [], ["--hidden", "64", "--layers", "4", "--batch", "2", "--seq", "32", "--steps", "3"]),
    ("sparse_memory", [], ["--tiny", "--steps", "2"]),
    ("fsdp2_memory", [], ["--configs", "bench", "--methods", "lora", "adalora", "--steps", "2", "--warmup", "1"]),
    ("selective_ddp", [], ["--tiny"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes (minutes); figures are not meaningful")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(b[0] for b in BENCHMARKS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--markdown", metavar="PATH", help="write the summary and every benchmark's output here")
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if not args.only or b[0] in args.only.split(",")]
    if not chosen:
        parser.error(f"--only must name some of {', '.join(b[0] for b in BENCHMARKS)}")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    sections: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lightning-peft-bench-") as tmp:
        summary = Path(tmp) / "summary.jsonl"
        env = {**os.environ, ENV: str(summary), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        for name, full, quick in chosen:
            out = Path(tmp) / f"{name}.md"
            cmd = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)]
            cmd += ["--device", device, "--markdown", str(out)]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=HERE.parent)
            print(f"== {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append(name)
            if out.exists():
                sections += [f"## {name}", "", f"    {' '.join(['python', *cmd[1:-2]])}", "", out.read_text(), ""]
        rows = [json.loads(line) for line in summary.read_text().splitlines()] if summary.exists() else []

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = [
        f"# lightning-peft benchmarks, {stamp}",
        "",
        f"{device_name(device)} ({device}, {os.cpu_count()} cores visible)"
        + (", **--quick sizes: not meaningful figures**" if args.quick else "")
        + ". Every figure below was measured in this run; see each benchmark's section for its setup.",
        "",
        "| benchmark | figure | value | goal | |",
        "|---|---|---:|---|---|",
    ]
    for row in rows:
        verdict = "" if row["met"] is None else ("PASS" if row["met"] else "MISS")
        head.append(f"| {row['benchmark']} | {row['metric']} | {row['value']:.3f} | {row['goal']} | {verdict} |")
    if failed:
        head += ["", f"Failed to run: {', '.join(failed)}."]
    table = "\n".join(head)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n\n" + "\n".join(sections))
        print(f"\nwritten to {args.markdown}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
