"""Small measuring helpers shared by the benchmark scripts.

- :func:`measure_matmul_peak_gflops`: the fp32 matmul rate numpy reaches on this machine,
  the practical hardware limit that benchmarks report their share of.
- :func:`run_with_peak_rss`: run one stage in a subprocess; wall time and the peak summed
  RSS of its whole process tree (children and grandchildren included), sampled from /proc.
- :func:`print_table`: a plain-text table.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def measure_matmul_peak_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """fp32 GFLOP/s of repeated ``n x n`` numpy matmuls over about ``seconds`` seconds.

    Uses every thread the BLAS library is allowed (set OMP/OPENBLAS_NUM_THREADS to limit).
    Returns the best rate of the timed repetitions (one warm-up first).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm-up
    flops = 2.0 * n**3
    best = 0.0
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        dt = time.perf_counter() - t0
        best = max(best, flops / dt / 1e9)
        if time.perf_counter() >= end:
            return best


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and ')': split after the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of ``root`` and all its descendants, now."""
    children = _children_map()
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_bytes(pid)
        stack.extend(children.get(pid, ()))
    return total


def run_with_peak_rss(
    cmd: Sequence[str | os.PathLike],
    *,
    interval: float = 0.05,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> tuple[float, int, int, str]:
    """Run ``cmd``; return ``(wall_s, peak_rss_bytes, returncode, stdout)``.

    The RSS of the whole process tree is summed and sampled every ``interval`` seconds
    (50 ms), so the peak is that of the stage alone, children included. stderr is passed
    through to this process's stderr (progress bars stay visible); stdout is captured.
    """
    out_chunks: list[bytes] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, env=env, cwd=cwd)
    reader = threading.Thread(
        target=lambda: out_chunks.extend(iter(lambda: proc.stdout.read(65536), b"")),
        daemon=True,
    )
    reader.start()
    peak = 0
    deadline = None if timeout is None else t0 + timeout
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            break
        time.sleep(interval)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    reader.join()
    return wall, peak, rc, b"".join(out_chunks).decode(errors="replace")


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Print ``rows`` under ``headers`` as an aligned plain-text table; return the text.

    Columns of numbers (or numeric strings such as "1,234") are right-aligned, others
    left-aligned; floats are printed with 3 decimals.

    >>> _ = print_table([["a", 1.23456, 1000], ["bb", 10.0, 2]], ["name", "x", "n"])
    name       x     n
    ----  ------  ----
    a      1.235  1000
    bb    10.000     2
    """

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in row] for row in rows]

    def is_num(v: object) -> bool:
        if v is None or isinstance(v, int | float):
            return True
        try:
            float(str(v).replace(",", "").rstrip("%x"))
        except ValueError:
            return str(v) in ("", "-")
        return True

    numeric = [bool(rows) and all(is_num(r[i]) for r in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(vals, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    text = "\n".join(
        [line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells]
    )
    print(text)
    return text
