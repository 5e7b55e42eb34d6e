"""Two builds of yuubin side by side: did a change make the hot path slower?

Starts one benchmark instance per build (each its own interpreter with yuubin installed, e.g.
the repo's .venv and a venv made from an older commit), then alternates smtp-source runs
between them, reversing the order every round so neither always follows the other. Before each
run the Maildir is renamed away (not deleted: file creation is slow after a mass delete on ext4
without a journal) and the machine settles. CPU per message is the server's process tree
utime+stime over the run; delivered msgs/s is messages / time until the Maildir holds them all.

    python bench/compare_builds.py --old OLD/.venv/bin/python --new .venv/bin/python \
        --rounds 6 --messages 2000 --sessions 20 --size 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat
from postfix_instance import SMTP_SOURCE, ensure_postfix_installed
from yuubin_instance import YuubinInstance


def _fresh_maildir(y: YuubinInstance, tag: str) -> None:
    assert y.dir is not None
    trash = y.dir / f"trash-{tag}"
    trash.mkdir()
    for sub in ("new", "cur", "tmp"):
        if (y.maildir / sub).exists():
            (y.maildir / sub).rename(trash / sub)
        (y.maildir / sub).mkdir(parents=True)


def _one_run(y: YuubinInstance, smtp_source: str, messages: int, sessions: int, size: int,
             timeout: float) -> tuple[float, float]:
    pid = y.pid
    assert pid is not None
    c0 = procstat.tree_cpu_seconds(pid)
    t0 = time.monotonic()
    subprocess.run([smtp_source, "-s", str(sessions), "-l", str(size), "-m", str(messages),
                    "-f", "bench@example.org", "-t", y.recipient, y.address], check=True, timeout=timeout)
    while len(os.listdir(y.maildir_new)) < messages:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{y.address}: not all {messages} messages delivered in {timeout}s")
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    return (procstat.tree_cpu_seconds(pid) - c0) * 1000 / messages, messages / elapsed


def _summary(values: list[float]) -> str:
    v = sorted(values)
    return f"{v[0]:.2f} / {statistics.median(v):.2f} / {v[-1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="interpreter with the older yuubin installed")
    ap.add_argument("--new", required=True, help="interpreter with the newer yuubin installed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    ensure_postfix_installed()
    smtp_source = SMTP_SOURCE
    builds = {"old": str(Path(args.old).absolute()), "new": str(Path(args.new).absolute())}
    instances: dict[str, YuubinInstance] = {}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in builds}
    try:
        for port, (name, python) in enumerate(builds.items(), start=25260):
            instances[name] = YuubinInstance(python=python, port=port).start()
        time.sleep(args.settle)
        for r in range(args.rounds):
            order = list(builds) if r % 2 == 0 else list(reversed(builds))
            for name in order:
                y = instances[name]
                _fresh_maildir(y, str(r))
                time.sleep(args.settle)
                cpu, rate = _one_run(y, smtp_source, args.messages, args.sessions, args.size, args.timeout)
                results[name].append((cpu, rate))
                print(f"round {r} {name}: {cpu:.2f} ms CPU/msg, {rate:.0f} delivered msgs/s", flush=True)
    finally:
        for y in instances.values():
            y.stop()
    print("\n| build | CPU ms/msg min / median / max | delivered msgs/s min / median / max |")
    print("|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {_summary([c for c, _ in rows])} | {_summary([t for _, t in rows])} |")
    med = {k: statistics.median(c for c, _ in v) for k, v in results.items() if v}
    if len(med) == 2:
        print(f"\nnew/old median CPU per message: {med['new'] / med['old']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
