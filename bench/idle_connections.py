"""Memory of yuubin with many idle SMTP connections open.

Opens N (default 1000) TCP connections to yuubin's MX listener, reads the
220 banner on each, holds them all open, then reads the server's
VmRSS/VmHWM from /proc/PID/status. Target: VmRSS < 64 MB with 1,000 idle
connections.

By default it starts its own yuubin (bench/yuubin_instance.py, whose config
allows 2000 connections per IP and 5000 in all). To measure an already
running server instead, pass --address HOST:PORT and --pid PID.

    python bench/idle_connections.py [--connections 1000] [--hold 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat

TARGET_MB = 64


async def _open_one(host: str, port: int, sem: asyncio.Semaphore, timeout: float):
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        # A banner may be multi-line ("220-..."); the last line is "220 ...".
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                writer.close()
                raise ConnectionError("closed before banner")
            if not line.startswith(b"220"):
                writer.close()
                raise ConnectionError(f"unexpected banner {line[:80]!r}")
            if line[3:4] != b"-":
                return reader, writer


async def measure_async(
    host: str,
    port: int,
    pid: int,
    connections: int = 1000,
    hold: float = 5.0,
    parallel_opens: int = 100,
    timeout: float = 30.0,
) -> dict:
    procstat.raise_nofile(connections + 1000)
    rss_before = procstat.rss_kib(pid)
    sem = asyncio.Semaphore(parallel_opens)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(_open_one(host, port, sem, timeout) for _ in range(connections)),
        return_exceptions=True,
    )
    open_s = time.monotonic() - t0
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    await asyncio.sleep(hold)
    # Still open? A closed connection has EOF (or data such as a 421) waiting.
    still_open = 0
    for reader, _writer in conns:
        if not reader.at_eof() and not reader._buffer:
            still_open += 1
    rss = procstat.rss_kib(pid)
    hwm = procstat.status_kb(pid, "VmHWM")
    tree_rss = procstat.tree_rss_kib(pid)
    for _reader, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _r, w in conns), return_exceptions=True)
    rss_kib = rss or 0
    return {
        "connections_requested": connections,
        "connections_opened": len(conns),
        "connections_still_open_after_hold": still_open,
        "open_seconds": round(open_s, 3),
        "hold_seconds": hold,
        "errors": sorted(set(errors))[:10],
        "error_count": len(errors),
        "rss_before_kib": rss_before,
        "rss_with_connections_kib": rss,
        "rss_tree_with_connections_kib": tree_rss,
        "vmhwm_kib": hwm,
        "rss_per_connection_kib": (round((rss_kib - (rss_before or 0)) / len(conns), 2) if conns else None),
        "target_mb": TARGET_MB,
        "pass": bool(rss) and rss_kib / 1024 < TARGET_MB and len(conns) == connections,
    }


def measure(host: str, port: int, pid: int, **kw) -> dict:
    return asyncio.run(measure_async(host, port, pid, **kw))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to hold before measuring")
    ap.add_argument("--address", help="HOST:PORT of a running yuubin (needs --pid)")
    ap.add_argument("--pid", type=int, help="PID of that yuubin process")
    ap.add_argument("--python", help="interpreter with yuubin installed (default: repo .venv)")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.connections > 5000:
        ap.error("at most 5000 connections (the bench config's max_connections)")

    if args.address:
        if not args.pid:
            ap.error("--address needs --pid")
        host, _, port = args.address.rpartition(":")
        if not host.startswith("127."):
            ap.error("loopback (127.0.0.0/8) only")
        res = measure(host, int(port), args.pid, connections=args.connections, hold=args.hold)
    else:
        from yuubin_instance import YuubinInstance

        with YuubinInstance(python=args.python) as y:
            time.sleep(1.0)  # let start-up allocations settle
            res = measure(y.host, y.port, y.pid, connections=args.connections, hold=args.hold)
            res["server_log_tail"] = y.log_tail(10).splitlines()
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    rss = res["rss_with_connections_kib"]
    print(
        f"yuubin VmRSS with {res['connections_opened']} idle connections: "
        f"{(rss or 0) / 1024:.1f} MiB (target < {TARGET_MB} MB): "
        f"{'PASS' if res['pass'] else 'FAIL'}",
        file=sys.stderr,
    )
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
