"""The agent's own cost on a board: CPU seconds per hour and peak memory.

Runs ``qrad-agent run --sim --speed 1`` (real time, default rates: sensors every 2 s, control
every 10 s) as a separate process, lets it warm up, then measures its CPU time over a fixed
window and its peak resident memory (VmHWM). prometheus-node-exporter, where installed
(Debian package), is measured the same way in the same run as a reference point for what a
"light" resident daemon costs. Targets: <= 3.6 CPU s per hour (0.1 % of one core) and
<= 40 MB peak RSS.

Run: ``.venv/bin/python -m benchmarks.overhead [--seconds 120]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

TARGET_CPU_S_PER_H = 3.6
TARGET_RSS_MB = 40.0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(argv: list[str], warmup_s: float, window_s: float) -> tuple[float, float]:
    """(CPU seconds per hour, peak RSS MB) of the process ``argv`` starts."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(warmup_s)
        p = psutil.Process(proc.pid)
        if proc.poll() is not None:
            raise SystemExit(f"{argv[0]} exited during warm-up with code {proc.returncode}")
        c0 = sum(p.cpu_times()[:2])
        t0 = time.monotonic()
        time.sleep(window_s)
        c1 = sum(p.cpu_times()[:2])
        elapsed = time.monotonic() - t0
        return (c1 - c0) * 3600.0 / elapsed, peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measurement window")
    ap.add_argument("--warmup", type=float, default=15.0)
    args = ap.parse_args(argv)

    agent_cmd = [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", "1"]
    cpu, rss = measure(agent_cmd, args.warmup, args.seconds)
    print(f"qrad-agent (simulated board, default rates), {args.seconds:.0f} s window:")
    print(f"  CPU      {cpu:6.2f} s per hour   target <= {TARGET_CPU_S_PER_H} "
          f"(ratio {cpu / TARGET_CPU_S_PER_H:.2f})")
    print(f"  peak RSS {rss:6.1f} MB          target <= {TARGET_RSS_MB:.0f} "
          f"(ratio {rss / TARGET_RSS_MB:.2f})")
    exporter = shutil.which("prometheus-node-exporter")
    if exporter:
        ecpu, erss = measure([exporter, "--web.listen-address=127.0.0.1:19100"],
                             args.warmup, args.seconds)
        print("prometheus-node-exporter (idle, unscraped), same window:")
        print(f"  CPU      {ecpu:6.2f} s per hour   agent/exporter {cpu / max(ecpu, 1e-9):.2f}")
        print(f"  peak RSS {erss:6.1f} MB          agent/exporter {rss / max(erss, 1e-9):.2f}")
    else:
        print("prometheus-node-exporter not installed: no reference point "
              "(apt-get install prometheus-node-exporter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
