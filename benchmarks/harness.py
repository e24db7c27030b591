"""How a benchmark runs: fresh-process workers, timed steps, peak memory, retries on a busy machine, the printed report.

A benchmark is a driver and one or more worker functions. The driver parses its options (:func:`add_common_args`,
:func:`parse_args`), runs each measurement in a fresh process (:func:`run_worker`, or :func:`run_ranks` for a
Lightning DDP/FSDP run whose ranks each report), repeats the ones other processes disturbed
(:func:`measure_each`), and prints through a :class:`Report` (header, Markdown tables, footer, ``--markdown``).
A worker function takes the driver's options as an ``argparse.Namespace`` and returns a JSON-able dict; inside it,
:class:`PeakMemory` and :class:`StepTimer` / :func:`measure_steps` give the figures every benchmark reports. See
"Writing a benchmark" in ``benchmarks/README.md``.

Run as a script, this file is the worker process: ``harness.py --call SCRIPT FUNCTION --spec JSON --out DIR``
imports ``SCRIPT`` as a module, calls ``FUNCTION`` and writes its result to ``DIR/rank<r>.json``. Lightning
relaunches that same command line for the other ranks, so every rank reports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from common import OthersLoad, cores, device_name, others_share, own_cpu_s, peak_rss_bytes, reset_peak_rss, rss_bytes

NOISY = 0.10  # share of the CPUs used by other processes above which a measurement is flagged as disturbed
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
_START = time.perf_counter()
_workers_cpu_s = 0.0  # CPU time the workers reported: the ranks Lightning starts are not our waited-for children


# ----------------------------------------------------------------------------------------------- options


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    warmup: int,
    device: str = "auto",
    threads: int | None = 0,
    retries: bool = True,
) -> None:
    """The options every benchmark shares: ``--steps``, ``--warmup``, ``--device``, ``--markdown``; ``--threads``
    unless ``threads`` is None (its default otherwise, 0 = the cores available); with ``retries`` the shared-machine
    options ``--wait-idle``, ``--noisy-retries`` and ``--repeats`` that :func:`measure_each` honours."""
    parser.add_argument("--steps", type=int, default=steps, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed training steps first")
    parser.add_argument("--device", default=device, choices=["auto", "cpu", "cuda"])
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads; 0 = the cores available")
    parser.add_argument("--markdown", metavar="PATH", help="also write the output to this file")
    if not retries:
        return
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: before each measurement, wait up to this long for other processes to go quiet",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=0,
        metavar="N",
        help=f"measure again, up to N times, when other processes used over {100 * NOISY:.0f} %% of the CPUs "
        "during the timed steps; the fastest run is kept",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure everything this many times, interleaved; the fastest is kept"
    )


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, check the common options, resolve ``--device auto`` and ``--threads 0``."""
    import torch

    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or getattr(args, "repeats", 1) < 1 or getattr(args, "noisy_retries", 0) < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup and --noisy-retries >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if getattr(args, "threads", None) is not None and args.threads <= 0:
        args.threads = cores()
    return args


# ----------------------------------------------------------------------------------------------- workers


class WorkerFailed(SystemExit):
    """A worker exited non-zero, or fewer ranks reported than expected. Uncaught, it ends the benchmark with
    the worker's output and a one-line reason (as ``sys.exit(message)`` does)."""

    def __init__(self, what: str, returncode: int | None, output: str, results: list[dict[str, Any]]) -> None:
        self.what, self.returncode, self.output, self.results = what, returncode, output, results
        super().__init__(f"{output}\nerror: {what} failed (exit {returncode}); its output is above")


def run_worker(fn: Callable[[argparse.Namespace], dict[str, Any]], spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """``fn(argparse.Namespace(**spec))`` in a fresh Python process; its returned dict. Options as :func:`run_ranks`."""
    return run_ranks(fn, spec, 1, **kw)[0]


def run_ranks(
    fn: Callable[[argparse.Namespace], dict[str, Any]],
    spec: dict[str, Any],
    ranks: int,
    *,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    label: str = "",
) -> list[dict[str, Any]]:
    """Run ``fn`` (a module-level function of a benchmark script) in a fresh process and return what each of its
    ``ranks`` ranks returned, rank 0 first: a Lightning run with ``devices=ranks`` relaunches the worker for the
    other ranks, and every rank reports.

    The worker gets ``HF_HUB_OFFLINE=1``, no inherited ``torch.distributed`` variables, ``OMP_NUM_THREADS`` and
    ``torch.set_num_threads`` set to ``threads`` (when given), plus ``env``. ``spec`` must be JSON-able (tuples come
    back as lists).

    Raises:
        WorkerFailed: the worker exited non-zero, timed out, or fewer than ``ranks`` ranks reported.
    """
    global _workers_cpu_s
    module = fn.__module__
    script = Path(sys.modules[module].__file__ or "").resolve()
    what = f"worker {label or fn.__name__}"
    with tempfile.TemporaryDirectory(prefix=f"{script.stem}_") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--call", str(script), fn.__name__]
        cmd += ["--spec", json.dumps(spec), "--out", out] + (["--threads", str(threads)] if threads else [])
        child_env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        child_env |= {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        child_env |= {"OMP_NUM_THREADS": str(threads)} if threads else {}
        child_env |= env or {}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
            raise WorkerFailed(f"{what} (timed out after {timeout:g} s)", None, tail[-6000:], []) from None
        deadline = time.monotonic() + 30  # rank 0 may exit just before the last rank has written its file
        files = sorted(Path(out).glob("rank*.json"))
        while len(files) < ranks and proc.returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            files = sorted(Path(out).glob("rank*.json"))
        reports = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    _workers_cpu_s += sum(r["cpu_s"] for r in reports)
    results = [r["result"] for r in reports]
    if proc.returncode != 0 or len(results) < ranks:
        output = proc.stdout[-2000:] + proc.stderr[-6000:]
        raise WorkerFailed(f"{what} ({len(results)} of {ranks} ranks reported)", proc.returncode, output, results)
    return results


def _worker_main(argv: list[str]) -> None:
    """The worker process: call the function, write this rank's result, wait for every rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--call", nargs=2, metavar=("SCRIPT", "FUNCTION"), required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    sys.modules.setdefault("harness", sys.modules["__main__"])  # the benchmark's `import harness` is this module
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    script = Path(args.call[0])
    sys.path.insert(0, str(script.parent))
    fn = getattr(importlib.import_module(script.stem), args.call[1])
    result = fn(argparse.Namespace(**json.loads(args.spec)))
    dist = sys.modules.get("torch.distributed")
    initialized = dist is not None and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else int(os.environ.get("LOCAL_RANK", "0"))
    out = Path(args.out) / f"rank{rank}.json"
    out.with_suffix(".tmp").write_text(json.dumps({"rank": rank, "cpu_s": own_cpu_s(), "result": result}))
    out.with_suffix(".tmp").replace(out)
    if initialized:
        dist.barrier()  # rank 0 leaves only once every rank has written its figures
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- measuring


QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}  # ``lightning.Trainer`` options of a measured run: nothing but the training steps


def sync(device: Any) -> None:
    """``torch.cuda.synchronize()`` when ``device`` is a CUDA device, so that a clock read sees finished work."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def optimizer_state_bytes(opt: Any) -> int:
    """Bytes of the tensors in ``opt.state`` (AdamW: the two moments and the step counters)."""
    import torch

    return sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class PeakMemory:
    """Peak memory over a baseline: ``torch.cuda.max_memory_allocated`` on CUDA, else this process's RSS high-water
    mark (``VmHWM``, reset through ``/proc/self/clear_refs``). ``start()`` takes the baseline (after
    ``gc.collect()``) and resets the peak; the growth excludes whatever was in memory before, e.g. the imports.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = str(device).startswith("cuda")

    def start(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before, self.is_reset = torch.cuda.memory_allocated(self.device), True
        else:
            self.before, self.is_reset = rss_bytes(), reset_peak_rss()
            if not self.is_reset:  # the high-water mark so far is the best baseline there is
                self.before = max(self.before, peak_rss_bytes())
        return self

    def reset(self) -> None:
        """Reset the peak, keep the baseline (a peak of what follows only)."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def now(self) -> int:
        """Memory in use now: allocated CUDA bytes, or the RSS."""
        import torch

        return torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def peak(self) -> int:
        import torch

        sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def figures(self, peak: int | None = None) -> dict[str, Any]:
        """``mem_before_bytes``, ``peak_bytes``, ``peak_growth_bytes`` (peak - baseline) and ``peak_is_reset``."""
        peak = self.peak() if peak is None else peak
        return {
            "mem_before_bytes": self.before,
            "peak_bytes": peak,
            "peak_growth_bytes": peak - self.before,
            "peak_is_reset": self.is_reset,
        }


class StepTimer:
    """Wall time of training steps, ``start()`` to ``stop()`` (synchronised on CUDA), after ``warmup`` untimed steps;
    optional phases within a step (``lap(name)``: the time since the last mark, summed per step); and the other
    processes' share of the CPUs over the ``steps`` timed steps. Call it from a loop or from Lightning hooks."""

    def __init__(self, steps: int, warmup: int = 0, device: Any = None) -> None:
        self.steps, self.warmup, self.device = steps, warmup, device
        self.step = 0
        self.times: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.others = OthersLoad()
        self.window: dict[str, float] | None = None
        self._t0 = self._last = 0.0
        self._laps: dict[str, float] = {}

    def start(self) -> None:
        if self.step == self.warmup:
            self.others.start()
        sync(self.device)
        self._t0 = self._last = time.perf_counter()
        self._laps = {}

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self._laps[name] = self._laps.get(name, 0.0) + now - self._last
        self._last = now

    def stop(self) -> float:
        sync(self.device)
        elapsed = time.perf_counter() - self._t0
        if self.step >= self.warmup:
            self.times.append(elapsed)
            for name, value in self._laps.items():
                self.phases.setdefault(name, []).append(value)
        self.step += 1
        if self.step == self.warmup + self.steps:
            self.window = self.others.window()
        return elapsed

    @property
    def timed(self) -> bool:
        """Whether the step now running (or about to start) is a timed one."""
        return self.step >= self.warmup

    def result(self) -> dict[str, Any]:
        """``step_s`` (median), ``step_min_s``, ``step_max_s``, ``step_times_s``, ``phases_s`` (medians),
        ``others_cpu_share`` and the raw ``others_window`` (for :func:`common.others_share` over several ranks)."""
        return {
            "step_s": statistics.median(self.times),
            "step_min_s": min(self.times),
            "step_max_s": max(self.times),
            "step_times_s": self.times,
            "phases_s": {k: statistics.median(v) for k, v in self.phases.items()},
            "others_cpu_share": others_share([self.window]),
            "others_window": self.window,
        }


def measure_steps(
    step: Callable[[int, StepTimer], Any],
    steps: int,
    warmup: int,
    device: Any = None,
    *,
    before_timed: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``step(i, timer)`` for ``warmup + steps`` steps, each timed by a :class:`StepTimer` (``timer.lap`` marks
    phases); ``before_timed()`` runs before the first timed step. Returns :meth:`StepTimer.result` and ``losses``:
    what ``step`` returned, as floats, read after the clock stopped."""
    timer = StepTimer(steps, warmup, device)
    losses = []
    for i in range(warmup + steps):
        if i == warmup and before_timed is not None:
            before_timed()
        timer.start()
        loss = step(i, timer)
        timer.stop()
        if loss is not None:
            losses.append(float(loss))
    return timer.result() | {"losses": losses}


# ----------------------------------------------------------------------------------------------- shared machines


def wait_idle(limit_s: float, threshold: float = NOISY) -> None:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` of the CPUs for 2 s running."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        probe = OthersLoad((resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)).start()
        time.sleep(2.0)
        share = probe.stop()
        if share is None or share < threshold:
            return


def disturbed(result: dict[str, Any]) -> bool:
    return (result.get("others_cpu_share") or 0.0) > NOISY


def fastest(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The try with the fastest median step (outside load only ever slows a run down), with ``tries`` (how many)
    and ``repeat_step_s`` (every try's median)."""
    best = dict(min(tries, key=lambda r: r["step_s"]))
    best["tries"] = len(tries)
    best["repeat_step_s"] = [r["step_s"] for r in tries]
    return best


def measure_each(
    keys: Iterable[Any],
    run: Callable[[Any], dict[str, Any]],
    args: argparse.Namespace,
    combine: Callable[[list[dict[str, Any]]], dict[str, Any]] = fastest,
) -> dict[Any, dict[str, Any]]:
    """``run(key)`` for every key, ``--repeats`` times interleaved (a burst of outside load then does not hit one key
    only), each after waiting up to ``--wait-idle`` seconds for quiet and measured again up to ``--noisy-retries``
    times while other processes disturbed it; ``combine`` makes one result of a key's tries. Progress on stderr."""
    keys = list(keys)
    tries: dict[Any, list[dict[str, Any]]] = {k: [] for k in keys}
    for _ in range(getattr(args, "repeats", 1)):
        for key in keys:
            label = "/".join(map(str, key)) if isinstance(key, tuple) else key
            print(f"[{time.perf_counter() - _START:5.0f} s] {label} ...", file=sys.stderr, flush=True)
            these: list[dict[str, Any]] = []
            while not these or (disturbed(these[-1]) and len(these) <= getattr(args, "noisy_retries", 0)):
                wait_idle(getattr(args, "wait_idle", 0.0))
                these.append(run(key))
            tries[key] += these
            _progress(these)
    return {k: combine(v) for k, v in tries.items()}


def _progress(tries: list[dict[str, Any]]) -> None:
    last = tries[-1]
    bits = [f"step {1000 * last['step_s']:.0f} ms"] if "step_s" in last else []
    if "peak_growth_bytes" in last:
        bits.append(f"peak growth {mib(last['peak_growth_bytes'])} MiB")
    shares = [f"{100 * t['others_cpu_share']:.0f} %" for t in tries if t.get("others_cpu_share") is not None]
    if shares:
        bits.append(f"others' CPU {', '.join(shares)}")
    print("        " + "; ".join(bits), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- printing


def mib(n: float | None, fmt: str = ".1f") -> str:
    return "—" if n is None else f"{n / 2**20:{fmt}}"


def ms(s: float | None) -> str:
    return "—" if s is None else f"{1000 * s:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "—"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def others_cell(share: float | None) -> str:
    """A table cell for the other processes' CPU share, flagged when it disturbed the measurement."""
    return "—" if share is None else f"{100 * share:.0f} %" + (" **disturbed**" if share > NOISY else "")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> list[str]:
    """A Markdown table: the first ``left`` columns left-aligned, the others (figures) right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(package)
    except PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    return "n/a"


class Report:
    """What a benchmark prints: lines go to stdout as they come and, with ``--markdown PATH``, to that file on
    :meth:`close`, after a footer with the wall time, the other processes' share of the CPUs meanwhile (the
    workers' own CPU time excluded) and the load average."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[str] = []
        self.start = time.perf_counter()
        self.load = OthersLoad().start()
        self.load_start = loadavg()

    def print(self, lines: str | list[str]) -> None:
        lines = [lines] if isinstance(lines, str) else lines
        print("\n".join(lines), flush=True)
        self.lines += lines

    def header(self, title: str, packages: Sequence[str] = (), details: str = "") -> None:
        """``title (date time)``, then the machine, versions, command, ``details`` and the load average."""
        import torch

        args = self.args
        threads = f", {args.threads} threads" if getattr(args, "threads", None) else ""
        versions = "".join(f", {p} {version(p)}" for p in packages)
        command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
        self.print(
            [
                f"{title} ({time.strftime('%Y-%m-%d %H:%M')})",
                "",
                f"Device: {device_name(args.device)}, {cores()} cores ({args.device}{threads}); torch "
                f"{torch.__version__}{versions}; python {platform.python_version()}. Command: `{command}`."
                + (f" {details}" if details else "")
                + f" Load average (1/5/15 min) at the start: {self.load_start}.",
                "",
            ]
        )

    def close(self) -> None:
        share = self.load.stop(extra_own_s=_workers_cpu_s)
        if self.lines and self.lines[-1]:
            self.print("")
        self.print(
            f"Total wall time {time.perf_counter() - self.start:.0f} s"
            + ("" if share is None else f"; other processes used {100 * share:.0f} % of the machine's CPU meanwhile")
            + f"; load average at the end: {loadavg()}."
        )
        if getattr(self.args, "markdown", None):
            Path(self.args.markdown).write_text("\n".join(self.lines) + "\n")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
