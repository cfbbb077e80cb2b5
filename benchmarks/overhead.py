"""The agent's own cost on a board: CPU seconds per hour and peak memory.

Runs ``qrad-agent run --sim --speed 1`` (real time, default rates: sensors every 2 s, control
every 10 s) as a separate process, lets it warm up, then measures its CPU time over a fixed
window and its peak resident memory (VmHWM). Targets: <= 3.6 CPU s per hour (0.1 % of one
core) and <= 40 MB peak RSS.

Reference point: prometheus-node-exporter (the Debian package), a resident daemon people
accept on every server, runs beside the agent over the same window and is measured the same
way: CPU from ``/proc/PID/stat`` (utime + stime), peak RSS from ``/proc/PID/status``
(VmHWM). It listens on a free loopback port and is scraped every ``--scrape-interval``
seconds (default 15 s, the interval of Prometheus's example configuration; Prometheus's own
default is 60 s), from the start of the warm-up, since an exporter nobody scrapes does almost
nothing. When it is not installed, a line says so and how to install it.

CPU time is counted in clock ticks (10 ms here), so a window of W seconds resolves
0.01 * 3600 / W CPU seconds per hour: 0.3 s/h for the default 120 s.

Run: ``.venv/bin/python -m benchmarks.overhead [--seconds 120] [--warmup 15]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TARGET_CPU_S_PER_H = 3.6
TARGET_RSS_MB = 40.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXPORTER = "prometheus-node-exporter"


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return int(fields[11]) + int(fields[12])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Subject:
    """One measured process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    ticks0: int = 0
    cpu_s_per_h: float = float("nan")
    ticks: int = 0
    rss_mb: float = float("nan")

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited early with code {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Scraper:
    """GETs ``url`` every ``interval_s`` on its own thread, as a Prometheus server would."""

    url: str
    interval_s: float
    scrapes: int = 0
    failures: int = 0
    bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    self.bytes += len(resp.read())
                self.scrapes += 1
            except OSError:
                self.failures += 1  # not listening yet, right after the start
            if self._stop.wait(self.interval_s if self.scrapes else 0.2):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


def measure(subjects: list[Subject], warmup_s: float, window_s: float) -> float:
    """Start every subject, warm up, measure all of them over the same window. Returns the
    window's real length."""
    time.sleep(warmup_s)
    for s in subjects:
        s.check_alive()
        s.ticks0 = cpu_ticks(s.pid)
    t0 = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - t0
    for s in subjects:
        s.check_alive()
        s.ticks = cpu_ticks(s.pid) - s.ticks0
        s.cpu_s_per_h = s.ticks / CLK_TCK * 3600.0 / elapsed
        s.rss_mb = peak_rss_mb(s.pid)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measurement window")
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--scrape-interval", type=float, default=15.0,
                    help="seconds between scrapes of the node exporter (default 15)")
    args = ap.parse_args(argv)

    agent = Subject("qrad-agent",
                    [sys.executable, "-m", "qrad_agent", "run", "--sim", "--speed", "1"])
    subjects = [agent]
    exporter_path = shutil.which(EXPORTER)
    exporter: Subject | None = None
    scraper: Scraper | None = None
    if exporter_path:
        port = free_port()
        exporter = Subject(EXPORTER, [exporter_path, f"--web.listen-address=127.0.0.1:{port}"])
        scraper = Scraper(f"http://127.0.0.1:{port}/metrics", args.scrape_interval)
        subjects.append(exporter)
    try:
        for s in subjects:
            s.start()
        if scraper is not None:
            scraper.start()
        elapsed = measure(subjects, args.warmup, args.seconds)
    finally:
        if scraper is not None:
            scraper.stop()
        for s in subjects:
            s.stop()

    resolution = 3600.0 / CLK_TCK / elapsed
    print(f"qrad-agent (simulated board, default rates), {elapsed:.0f} s window "
          f"(CPU resolution {resolution:.2f} s/h):")
    print(f"  CPU      {agent.cpu_s_per_h:6.2f} s per hour   target <= {TARGET_CPU_S_PER_H} "
          f"(ratio {agent.cpu_s_per_h / TARGET_CPU_S_PER_H:.2f})")
    print(f"  peak RSS {agent.rss_mb:6.1f} MB          target <= {TARGET_RSS_MB:.0f} "
          f"(ratio {agent.rss_mb / TARGET_RSS_MB:.2f})")
    if exporter is not None and scraper is not None:
        out = subprocess.run([exporter.argv[0], "--version"], capture_output=True, text=True)
        version = (out.stdout or out.stderr).split("\n")[0] or "version unknown"
        print(f"{EXPORTER} ({version.strip()}), same window, scraped every "
              f"{args.scrape_interval:g} s ({scraper.scrapes} scrapes, "
              f"{scraper.bytes / max(scraper.scrapes, 1) / 1024:.0f} KiB each, "
              f"{scraper.failures} refused while starting):")
        print(f"  CPU      {exporter.cpu_s_per_h:6.2f} s per hour   agent/exporter "
              f"{agent.cpu_s_per_h / max(exporter.cpu_s_per_h, 1e-9):.2f}")
        print(f"  peak RSS {exporter.rss_mb:6.1f} MB          agent/exporter "
              f"{agent.rss_mb / max(exporter.rss_mb, 1e-9):.2f}")
    else:
        print(f"{EXPORTER} not installed: no reference point (on Debian or Ubuntu: "
              f"apt-get install {EXPORTER})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
