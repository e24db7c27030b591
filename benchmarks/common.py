"""What the benchmarks read off the machine (device name, RSS and its high-water mark, CPU time, the other processes'
load), the benchmark ``LlamaConfig``, the rank device, and the summary. How a benchmark runs is in ``harness.py``.

A benchmark calls :func:`record` for each headline figure. Nothing happens unless the environment
variable ``LIGHTNING_PEFT_BENCH_SUMMARY`` names a JSON-lines file (``run_all.py`` sets it), so every
benchmark still runs on its own exactly as before.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from typing import Any

ENV = "LIGHTNING_PEFT_BENCH_SUMMARY"  # names the JSON-lines file run_all.py collects


def quiet_cpu_trainer(**kwargs: Any) -> Any:
    """A one-device CPU ``lightning.Trainer`` that writes and prints nothing of its own (no logger, checkpoints,
    progress bar or model summary); ``kwargs`` add to or override that."""
    import lightning.pytorch as pl

    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def record(benchmark: str, metric: str, value: float, goal: str = "", met: bool | None = None) -> None:
    """Append one figure: ``value`` of ``metric`` in ``benchmark``, with its goal (e.g. ``"<= 0.5"``) if it has one."""
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"benchmark": benchmark, "metric": metric, "value": float(value), "goal": goal, "met": met}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _status_kib(key: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of ``/proc/self/status`` in KiB, or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is None:  # no procfs: fall back to the high-water mark itself
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (since :func:`reset_peak_rss`), in bytes.

    Read from ``VmHWM``: ``ru_maxrss`` ignores the reset and, after fork+exec, carries the parent's peak.
    """
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def machine_busy_s() -> float | None:
    """CPU-seconds all processes on this machine have spent busy since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s(who: tuple[int, ...] = (resource.RUSAGE_SELF,)) -> float:
    """CPU-seconds used by ``who`` (this process, and/or its children)."""
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OthersLoad:
    """Share of the machine's CPU capacity that *other* processes used between ``start()`` and ``stop()``.

    On a shared machine a burst of someone else's work can slow a step many times over; this says
    how much of that there was, so a noisy figure can be recognised as such.
    """

    def __init__(self, who: tuple[int, ...] = (resource.RUSAGE_SELF,)) -> None:
        self.who = who

    def start(self) -> OthersLoad:
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s(self.who)
        return self

    def window(self) -> dict[str, float] | None:
        """The raw figures since ``start()``: ``wall_s``, the machine's ``busy_s`` and our ``own_s``; None without
        ``/proc/stat``. Several processes' windows combine with :func:`others_share`."""
        busy1 = machine_busy_s()
        if self.busy0 is None or busy1 is None:
            return None
        return {
            "wall_s": time.perf_counter() - self.t0,
            "busy_s": busy1 - self.busy0,
            "own_s": own_cpu_s(self.who) - self.own0,
        }

    def stop(self, extra_own_s: float = 0.0) -> float | None:
        """The share; ``extra_own_s``: CPU time of our own that ``who`` does not see (e.g. workers' reports)."""
        return others_share([self.window()], extra_own_s)


def others_share(windows: list[dict[str, float] | None], extra_own_s: float = 0.0) -> float | None:
    """Other processes' share of the machine's CPUs over overlapping :meth:`OthersLoad.window` s of cooperating
    processes (e.g. the ranks of one run): the machine's busy time less all of theirs, over the longest window."""
    if not windows or any(w is None for w in windows):
        return None
    wall = max(w["wall_s"] for w in windows)  # type: ignore[index]
    if wall <= 0:
        return None
    others = max(w["busy_s"] for w in windows) - sum(w["own_s"] for w in windows) - extra_own_s  # type: ignore[index]
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_config(size: dict[str, int]) -> Any:
    """The benchmarks' ``LlamaConfig`` from a size dict (``vocab``, ``hidden``, ``intermediate``, ``layers``, ``heads``,
    ``seq``): as many key/value heads as heads, no KV cache."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=max(512, size["seq"]),
        use_cache=False,
    )


def rank_device(kind: str) -> Any:
    """This rank's device: ``cuda:LOCAL_RANK`` (made the current one) for ``"cuda"``, else the CPU."""
    import torch

    if kind != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # set by Lightning for the ranks it starts
    torch.cuda.set_device(device)
    return device
