"""yuubin vs Postfix throughput benchmark with Postfix's smtp-source.

Runs the matrix {20, 50} concurrent sessions x {2 KiB, 64 KiB} messages
against yuubin (MX listener 127.0.0.2:2525) and a private Postfix instance
(127.0.0.3:2526), both delivering to a Maildir on the same machine.
Runs are interleaved (yuubin, postfix, yuubin, postfix, ...). For each run:

* empty both Maildirs, wait for the server's queue to be empty, sleep
  --settle seconds (file creation is slow right after a mass delete);
* time smtp-source (accepted msgs/s = messages / smtp-source wall time);
* poll the Maildir new/ until it holds all messages (delivered msgs/s =
  messages / time from smtp-source start to the last file appearing);
* record the server's CPU seconds over the run (/proc/PID/stat
  utime+stime, whole process tree, reaped children included).

Before the matrix it also measures yuubin's VmRSS with 1,000 idle
connections (bench/idle_connections.py) on the freshly started server.

Writes bench/results.json and renders bench/RESULTS.md.

    python bench/run.py            # full matrix, 5 runs each (~30-60 min)
    python bench/run.py --quick    # smoke run: 1 run, few messages, short settle
    python bench/run.py --only postfix --quick
    python bench/run.py --render   # re-render RESULTS.md from results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import idle_connections  # noqa: E402
import procstat  # noqa: E402
from postfix_instance import (  # noqa: E402
    SMTP_SOURCE,
    PostfixInstance,
    ensure_postfix_installed,
    postfix_version,
)
from yuubin_instance import YuubinInstance, python_exe  # noqa: E402

RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SENDER = "sender@bench.example"
HELO_NAME = "client.bench.example"
SIZES = {2048: "2 KiB", 65536: "64 KiB"}


# --------------------------------------------------------------------------
# helpers


def empty_maildir(maildir: Path) -> int:
    """Move the messages in new/, cur/ and tmp/ aside (rename), do not delete them.

    Deleting thousands of files makes file creation slow on this ext4 for about a minute, which
    would slow whichever server runs next; the trash goes when the instance's temp dir goes.
    """
    if not maildir.is_dir():
        return 0
    trash = maildir.parent / f".trash-{maildir.name}"
    trash.mkdir(exist_ok=True)
    n = 0
    for sub in ("new", "cur", "tmp"):
        d = maildir / sub
        if not d.is_dir():
            continue
        n += count_new(d)
        st = d.stat()
        os.rename(d, trash / f"{sub}-{time.time_ns()}")
        d.mkdir(mode=st.st_mode & 0o7777)
        os.chown(d, st.st_uid, st.st_gid)
    return n


def count_new(d: Path) -> int:
    try:
        with os.scandir(d) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def smtp_source_cmd(sessions: int, messages: int, size: int, address: str, recipient: str, reuse: bool) -> list[str]:
    cmd = [
        SMTP_SOURCE,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        HELO_NAME,
        "-f",
        SENDER,
        "-t",
        recipient,
    ]
    if reuse:
        cmd.insert(1, "-d")
    return [*cmd, address]


def server_cpu(server) -> float | None:
    pid = server.pid if server.name == "yuubin" else server.master_pid()
    if not pid:
        return None
    try:
        return procstat.tree_cpu_seconds(pid)
    except OSError:
        return None


def wait_queue_empty(server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.queue_empty():
            return True
        time.sleep(0.5)
    return False


def one_run(server, sessions: int, size: int, messages: int, args) -> dict:
    empty_maildir(server.maildir)
    if not wait_queue_empty(server, 60):
        print(f"  warning: {server.name} queue not empty before run", file=sys.stderr)
    # Empty again in case the queue flushed late deliveries into the Maildir.
    empty_maildir(server.maildir)
    os.sync()
    time.sleep(args.settle)
    cmd = smtp_source_cmd(sessions, messages, size, server.address, server.recipient, args.reuse)
    rec: dict = {
        "server": server.name,
        "sessions": sessions,
        "size": size,
        "messages": messages,
        "command": shlex.join(cmd),
        "ok": False,
    }
    cpu0 = server_cpu(server)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        rc, out = p.returncode, (p.stdout + p.stderr).strip()
    except subprocess.TimeoutExpired as exc:
        rc, out = None, f"smtp-source timed out after {args.timeout}s: {exc.stderr or ''}"
    t1 = time.monotonic()
    rec["smtp_source_rc"] = rc
    rec["smtp_source_output"] = out[-2000:]
    rec["accept_seconds"] = round(t1 - t0, 4)
    deadline = t1 + args.timeout
    # Give up early when deliveries stop coming: after 10 s without progress if
    # smtp-source failed (the rest was never accepted), after --stall otherwise.
    stall = 10.0 if rc != 0 else args.stall
    n = count_new(server.maildir_new)
    last_n, last_change = n, time.monotonic()
    while n < messages and time.monotonic() < deadline:
        if server.name == "yuubin" and not server.alive():
            break
        time.sleep(args.poll)
        n = count_new(server.maildir_new)
        now = time.monotonic()
        if n != last_n:
            last_n, last_change = n, now
        elif now - last_change > stall:
            rec["stalled"] = True
            break
    t2 = time.monotonic()
    cpu1 = server_cpu(server)
    rec["delivered"] = n
    rec["deliver_seconds"] = round(t2 - t0, 4)
    if rc == 0:
        rec["accepted_per_s"] = round(messages / (t1 - t0), 2)
    if rc == 0 and n >= messages:
        rec["delivered_per_s"] = round(messages / (t2 - t0), 2)
        rec["ok"] = True
    if cpu0 is not None and cpu1 is not None:
        rec["cpu_seconds"] = round(cpu1 - cpu0, 3)
        rec["cpu_ms_per_message"] = round((cpu1 - cpu0) * 1000 / messages, 4)
    pid = server.pid if server.name == "yuubin" else None
    if pid:
        rec["rss_kib_after"] = procstat.rss_kib(pid)
        rec["vmhwm_kib"] = procstat.status_kb(pid, "VmHWM")
    if not rec["ok"]:
        rec["log_tail"] = server.log_tail(25)
    return rec


def machine_info(python: str) -> dict:
    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=BENCH_DIR).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = ""
    with contextlib.suppress(OSError, IndexError):
        mem_total = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh(["nproc"]) or str(os.cpu_count()),
        "cpu_model": cpu_model,
        "mem_total": mem_total,
        "kernel": platform.release(),
        "os": sh(["sh", "-c", '. /etc/os-release && echo "$PRETTY_NAME"']),
        "python": sh([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "postfix": postfix_version(),
        "yuubin_commit": sh(["git", "rev-parse", "--short", "HEAD"]) or "(no commit)",
        "yuubin_tree_dirty": bool(sh(["git", "status", "--porcelain", "--", "../src"])),
    }


# --------------------------------------------------------------------------
# rendering


def _stats(vals: list[float]) -> tuple[float, float, float] | None:
    if not vals:
        return None
    return min(vals), statistics.median(vals), max(vals)


def _fmt3(s: tuple[float, float, float] | None, digits: int = 1) -> str:
    if not s:
        return "n/a"
    return " / ".join(f"{v:.{digits}f}" for v in s)


def render(data: dict) -> str:
    m = data["machine"]
    cfg = data["config"]
    lines = [
        "# yuubin vs Postfix: benchmark results",
        "",
        "Generated by `bench/run.py` (see `bench/README.md`). Numbers are "
        "messages per second, shown as **min / median / max** over the runs; "
        "the ratio is median(yuubin) / median(Postfix) (> 1 means yuubin is faster). "
        "What limits yuubin, and what is next: the last section.",
        "",
        "* **accepted**: messages / wall time of `smtp-source` (all SMTP transactions answered 250).",
        "* **delivered**: messages / time from `smtp-source` start until the Maildir `new/` holds every message.",
        "* **CPU ms/msg**: server CPU (utime+stime of the process tree, from "
        "/proc/PID/stat) over that same interval, per message. yuubin's budget "
        "is < 1 ms per message.",
        "",
        "## Machine",
        "",
        f"* date: {m.get('date')}",
        f"* nproc: {m.get('nproc')}; CPU: {m.get('cpu_model') or 'unknown'}; memory: {m.get('mem_total')}",
        f"* OS: {m.get('os')}; kernel {m.get('kernel')}",
        f"* Python (yuubin's interpreter): {m.get('python')}",
        f"* Postfix: {m.get('postfix')}",
        f"* yuubin commit: {m.get('yuubin_commit')}"
        + (" (src/ had uncommitted changes)" if m.get("yuubin_tree_dirty") else ""),
        "",
        "## Settings",
        "",
        f"* runs per server and cell: {cfg['runs']} (interleaved yuubin, Postfix, yuubin, ...)",
        f"* settle before each run: {cfg['settle']} s after emptying the Maildir",
        f"* connection reuse (`smtp-source -d`): {'yes' if cfg.get('reuse') else 'no (one connection per message)'}",
        f"* servers: {', '.join(cfg['servers'])}",
        f"* quick mode: {'yes (smoke run, not a benchmark)' if cfg.get('quick') else 'no'}",
        f"* yuubin `[server] workers`: {cfg.get('workers', 1)}",
        "",
    ]
    idle = data.get("idle")
    if idle:
        rss = idle.get("rss_with_connections_kib") or 0
        lines += [
            "## Memory with 1,000 idle connections",
            "",
            f"`bench/idle_connections.py`: {idle['connections_opened']} of "
            f"{idle['connections_requested']} connections opened (banner read), "
            f"{idle['connections_still_open_after_hold']} still open after "
            f"{idle['hold_seconds']} s.",
            "",
            "| yuubin VmRSS before | with connections | per connection | VmHWM | target | result |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {(idle.get('rss_before_kib') or 0) / 1024:.1f} MiB | {rss / 1024:.1f} MiB | "
            f"{idle.get('rss_per_connection_kib')} KiB | "
            f"{(idle.get('vmhwm_kib') or 0) / 1024:.1f} MiB | < {idle['target_mb']} MB | "
            f"**{'PASS' if idle.get('pass') else 'FAIL'}** |",
            "",
        ]
        if idle.get("errors"):
            lines += [f"Errors ({idle['error_count']}): `{idle['errors']}`", ""]

    runs = data["runs"]
    cells = sorted({(r["sessions"], r["size"]) for r in runs}, key=lambda c: (c[1], c[0]))
    lines += ["## Throughput", ""]
    summary = [
        "| cell | yuubin accepted | Postfix accepted | ratio | yuubin delivered "
        "| Postfix delivered | ratio | yuubin CPU ms/msg | Postfix CPU ms/msg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    details: list[str] = []
    for sessions, size in cells:
        cell_runs = [r for r in runs if r["sessions"] == sessions and r["size"] == size]
        label = f"{sessions} sessions x {SIZES.get(size, f'{size} B')}"
        msgs = cell_runs[0]["messages"]
        st = {}
        for srv in ("yuubin", "postfix"):
            rs = [r for r in cell_runs if r["server"] == srv]
            st[srv] = {
                "n": len(rs),
                "ok": sum(1 for r in rs if r["ok"]),
                "acc": _stats([r["accepted_per_s"] for r in rs if "accepted_per_s" in r]),
                "del": _stats([r["delivered_per_s"] for r in rs if "delivered_per_s" in r]),
                "cpu": _stats([r["cpu_ms_per_message"] for r in rs if r.get("ok") and "cpu_ms_per_message" in r]),
                "rss": [r["rss_kib_after"] for r in rs if r.get("rss_kib_after")],
                "cmd": rs[0]["command"] if rs else None,
                "fail": [r for r in rs if not r["ok"]],
            }

        def ratio(key: str, st: dict = st) -> str:
            a, b = st["yuubin"][key], st["postfix"][key]
            if not a or not b or not b[1]:
                return "n/a"
            return f"{a[1] / b[1]:.2f}"

        summary.append(
            f"| {label} | {_fmt3(st['yuubin']['acc'])} | {_fmt3(st['postfix']['acc'])} | "
            f"{ratio('acc')} | {_fmt3(st['yuubin']['del'])} | {_fmt3(st['postfix']['del'])} | "
            f"{ratio('del')} | {_fmt3(st['yuubin']['cpu'], 3)} | {_fmt3(st['postfix']['cpu'], 3)} |"
        )
        details += [
            f"### {label}, {msgs} messages per run",
            "",
            "| server | ok runs | accepted msg/s (min / median / max) "
            "| delivered msg/s (min / median / max) | CPU ms/msg (min / median / max) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for srv, name in (("yuubin", "yuubin"), ("postfix", "Postfix")):
            s = st[srv]
            if not s["n"]:
                continue
            details.append(
                f"| {name} | {s['ok']}/{s['n']} | {_fmt3(s['acc'])} | {_fmt3(s['del'])} | {_fmt3(s['cpu'], 3)} |"
            )
        details += [
            "",
            f"Ratio yuubin/Postfix (medians): accepted {ratio('acc')}, delivered {ratio('del')}.",
            "",
        ]
        if st["yuubin"]["rss"]:
            details += [
                f"yuubin VmRSS after each run: {', '.join(f'{k / 1024:.1f}' for k in st['yuubin']['rss'])} MiB.",
                "",
            ]
        details += ["Commands:", "", "```"]
        details += [st[s]["cmd"] for s in ("yuubin", "postfix") if st[s]["cmd"]]
        details += ["```", ""]
        for srv in ("yuubin", "postfix"):
            for r in st[srv]["fail"]:
                details += [
                    f"Failed {srv} run {r.get('run')}: smtp-source rc={r.get('smtp_source_rc')}"
                    + (f" (killed by signal {-r['smtp_source_rc']})" if (r.get("smtp_source_rc") or 0) < 0 else "")
                    + ", "
                    f"delivered {r.get('delivered')}/{r['messages']} "
                    f"after {r.get('deliver_seconds')} s.",
                    "",
                    "```",
                    (r.get("smtp_source_output") or "")[-800:],
                    (r.get("log_tail") or "")[-1500:],
                    "```",
                    "",
                ]
    lines += [*summary, "", *details]
    lines += [
        "## Setup",
        "",
        "* yuubin: `python -m yuubin -c CONFIG serve`, MX listener 127.0.0.2:2525, "
        "config in `bench/yuubin_instance.py` (`[limits] connections_per_ip = 2000`, "
        "`max_connections = 5000`, no DNSBL, DNS pointed at a closed loopback port).",
        "* Postfix: private instance from `bench/postfix_instance.py`: smtpd on "
        "127.0.0.3:2526, `virtual` delivery to Maildir, chroot off, Postfix defaults "
        "otherwise (process limit 100, `virtual` concurrency 20); bounces can never "
        "leave the machine (`default_transport = error`); logging to a file via postlogd.",
        "* Both deliver into a Maildir on the same filesystem; all traffic on loopback.",
        "",
    ]
    analysis = Path(__file__).resolve().parent / "analysis.md"
    if analysis.exists():  # the written verdict and profile notes that go with these numbers
        lines += [analysis.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, help="runs per server and cell (default 5; --quick: 1)")
    ap.add_argument(
        "--messages", type=int, help="messages per run for every cell (default 5000 at 2 KiB, 2000 at 64 KiB)"
    )
    ap.add_argument("--sessions", default="20,50", help="comma list (default 20,50)")
    ap.add_argument("--sizes", default="2048,65536", help="comma list of bytes (default 2048,65536)")
    ap.add_argument("--settle", type=float, help="seconds to wait after emptying the Maildir (default 5; --quick: 2)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="bound for smtp-source and for delivery, each, per run (default 900 s)",
    )
    ap.add_argument("--poll", type=float, default=0.1, help="Maildir poll interval (s)")
    ap.add_argument(
        "--stall",
        type=float,
        default=120.0,
        help="give up on a run's delivery after this many seconds without progress (default 120)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="smtp-source -d: send all messages of a session over one connection"
    )
    ap.add_argument("--only", choices=["both", "yuubin", "postfix"], default="both")
    ap.add_argument("--no-idle", action="store_true", help="skip the 1,000 idle connections test")
    ap.add_argument("--idle-connections", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run, 200/50 messages, 2 s settle")
    ap.add_argument("--python", help="interpreter with yuubin installed (default: repo .venv)")
    ap.add_argument("--workers", type=int, default=1,
                    help="yuubin's [server] workers (processes sharing the listener; default 1)")
    ap.add_argument("--json", help="results JSON path (default bench/results.json; --quick: results-quick.json)")
    ap.add_argument("--md", help="rendered Markdown path (default bench/RESULTS.md; --quick: RESULTS-quick.md)")
    ap.add_argument("--render", action="store_true", help="only re-render --md from --json")
    args = ap.parse_args(argv)

    if args.json is None:
        args.json = str(BENCH_DIR / "results-quick.json" if args.quick else RESULTS_JSON)
    if args.md is None:
        args.md = str(BENCH_DIR / "RESULTS-quick.md" if args.quick else RESULTS_MD)
    if args.render:
        data = json.loads(Path(args.json).read_text())
        Path(args.md).write_text(render(data))
        print(f"wrote {args.md}")
        return 0

    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.settle is None:
        args.settle = 2.0 if args.quick else 5.0
    sessions = [int(s) for s in args.sessions.split(",") if s]
    sizes = [int(s) for s in args.sizes.split(",") if s]

    def messages_for(size: int) -> int:
        if args.messages:
            return args.messages
        if args.quick:
            return 200 if size <= 4096 else 50
        return 5000 if size <= 4096 else 2000

    if os.geteuid() != 0 and args.only != "yuubin":
        print("note: the Postfix instance needs root", file=sys.stderr)
    ensure_postfix_installed()
    python = python_exe(args.python)
    servers_wanted = ["yuubin", "postfix"] if args.only == "both" else [args.only]
    data: dict = {
        "machine": machine_info(python),
        "config": {
            "runs": args.runs,
            "settle": args.settle,
            "sessions": sessions,
            "sizes": sizes,
            "messages": {str(s): messages_for(s) for s in sizes},
            "reuse": args.reuse,
            "quick": args.quick,
            "servers": servers_wanted,
            "workers": args.workers,
        },
        "runs": [],
    }

    def save() -> None:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        Path(args.md).write_text(render(data))

    servers = []
    try:
        if "yuubin" in servers_wanted:
            y = YuubinInstance(python=python, workers=args.workers)
            servers.append(y)
            print(f"starting yuubin on {y.address} ...", flush=True)
            y.start()
            if not args.no_idle:
                time.sleep(1.0)
                print(f"idle test: {args.idle_connections} connections ...", flush=True)
                try:
                    data["idle"] = idle_connections.measure(y.host, y.port, y.pid, connections=args.idle_connections)
                except Exception as exc:  # report, keep benchmarking
                    data["idle"] = None
                    print(f"  idle test failed: {exc!r}", file=sys.stderr)
                if data.get("idle"):
                    i = data["idle"]
                    print(
                        f"  {i['connections_opened']} open, VmRSS "
                        f"{(i['rss_with_connections_kib'] or 0) / 1024:.1f} MiB "
                        f"({'PASS' if i['pass'] else 'FAIL'})",
                        flush=True,
                    )
                time.sleep(2.0)  # let the server notice the closes
        if "postfix" in servers_wanted:
            pf = PostfixInstance()
            servers.append(pf)
            print(f"starting postfix on {pf.address} ...", flush=True)
            pf.start()

        total = len(sessions) * len(sizes) * args.runs * len(servers)
        k = 0
        for size in sizes:
            for s in sessions:
                msgs = messages_for(size)
                for run in range(args.runs):
                    for server in servers:
                        k += 1
                        print(
                            f"[{k}/{total}] {server.name}: {s} sessions, {size} B, "
                            f"{msgs} msgs, run {run + 1}/{args.runs} ...",
                            end=" ",
                            flush=True,
                        )
                        if server.name == "yuubin" and not server.alive():
                            raise RuntimeError(f"yuubin died:\n{server.log_tail()}")
                        rec = one_run(server, s, size, msgs, args)
                        rec["run"] = run + 1
                        data["runs"].append(rec)
                        if rec["ok"]:
                            cpu = rec.get("cpu_ms_per_message")
                            print(
                                f"accepted {rec['accepted_per_s']}/s, delivered "
                                f"{rec['delivered_per_s']}/s, cpu {cpu} ms/msg",
                                flush=True,
                            )
                        else:
                            print(
                                f"FAILED (rc={rec['smtp_source_rc']}, delivered "
                                f"{rec['delivered']}/{msgs}): "
                                f"{rec['smtp_source_output'][-300:]}",
                                flush=True,
                            )
                        save()
        # Leave the Maildirs empty (they live in temp dirs that are removed anyway).
    finally:
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as exc:
                print(f"stopping {server.name}: {exc!r}", file=sys.stderr)
        save()
    print(f"wrote {args.json} and {args.md}")
    bad = [r for r in data["runs"] if not r["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
