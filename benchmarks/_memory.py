"""Memory samplers of the benchmarks: anonymous RSS of a process, peaks per group of processes in a thread,
torchrun's ranks as groups, and waiting for a process's memory to settle (`scale_bench.py`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MB = 2**20


def anon_bytes(pid: int) -> int:
    """Resident anonymous memory of a process (RssAnon in /proc/PID/status; 0 elsewhere than Linux).

    What the process allocated itself (heap, arrays, buffers). Unlike USS it does not move when another process
    maps the same library pages (torch, TileDB): on a shared machine USS jumped by 100 MB between identical runs.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak RSS, anonymous RSS, PSS and USS per group of processes, sampled in a thread.

    `groups()` returns {key: [psutil.Process, ...]}; a group's memory is the sum over its processes. RSS and
    anonymous RSS (cheap: /proc/PID/statm and status) every `rss_every` seconds; PSS and USS need a page-table walk (/proc/PID/smaps_rollup,
    milliseconds of kernel time that also stall the sampled process), so every `full_every` seconds only.
    """

    def __init__(
        self,
        groups: Callable[[], dict[str, list]],
        rss_every: float = 0.1,
        full_every: float = 1.0,
    ) -> None:
        self.groups = groups
        self.rss_every, self.full_every = rss_every, full_every
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, full: bool) -> None:
        for key, procs in self.groups().items():
            total = {"rss": 0, "anon": 0, "pss": 0, "uss": 0} if full else {"rss": 0, "anon": 0}
            for proc in procs:
                try:
                    info = proc.memory_full_info() if full else proc.memory_info()
                    anon = anon_bytes(proc.pid)
                except Exception:  # noqa: BLE001 - a process that just exited
                    continue
                total["anon"] += anon
                for field in total.keys() - {"anon"}:
                    total[field] += getattr(info, field, info.rss)
            peak = self.peaks.setdefault(key, {"rss": 0, "anon": 0, "pss": 0, "uss": 0})
            for field, value in total.items():
                peak[field] = max(peak[field], value)

    def _run(self) -> None:
        last_full = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            full = now - last_full >= self.full_every
            if full:
                last_full = now
            self._sample(full)
            self._stop.wait(self.rss_every)

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop sampling (one last full sample first); peaks in MB per group."""
        self._sample(True)
        self._stop.set()
        self._thread.join()
        return {key: {f: v / MB for f, v in peak.items()} for key, peak in self.peaks.items()}


class RankProcesses:
    """`groups()` for `PeakMemory`: each torchrun worker by its RANK variable ("0", "1", ...), and the same with
    its descendants ("0/tree", ...: loader worker processes, when data.worker_processes is on). Only PSS adds
    up over a tree: a child forked to run a command reports the parent's pages as its own RSS until it execs."""

    def __init__(self, launcher_pid: int) -> None:
        import psutil

        self.launcher = psutil.Process(launcher_pid)
        self.ranks: dict[int, str] = {}  # pid -> rank

    def __call__(self) -> dict[str, list]:
        groups: dict[str, list] = {}
        try:
            workers = self.launcher.children()
        except Exception:  # noqa: BLE001 - torchrun has exited
            return groups
        for proc in workers:
            if proc.pid not in self.ranks:
                try:
                    rank = proc.environ().get("RANK")
                except Exception:  # noqa: BLE001 - not exec'd yet, or gone
                    continue
                if rank is None:
                    continue
                self.ranks[proc.pid] = rank
            rank = self.ranks[proc.pid]
            groups[rank] = [proc]
            try:
                groups[f"{rank}/tree"] = [proc, *proc.children(recursive=True)]
            except Exception:  # noqa: BLE001 - gone
                continue
        return groups


def settle(sample, every: float = 0.1, window: int = 5, tolerance_mb: float = 0.5, limit_s: float = 10.0) -> float:
    """Wait until the loader's read-ahead is idle: `sample()` (MB) moved by less than `tolerance_mb` over
    `window` samples, or `limit_s` passed; the seconds waited.

    After the batches, the reading thread goes on filling its units in flight, and a snapshot taken while one of
    its TileDB reads is open counts that read's tile buffers (bounded by the per-query budget, tens of MB with
    16 genes a cell, where one X tile spans ~90,000 cells) as if they were per-cell state. The peak columns
    report those buffers.
    """
    t0 = time.perf_counter()
    values = [sample()]
    while time.perf_counter() - t0 < limit_s:
        time.sleep(every)
        values.append(sample())
        recent = values[-window:]
        if len(recent) == window and max(recent) - min(recent) < tolerance_mb:
            break
    return time.perf_counter() - t0
