#!/usr/bin/env python3
"""The SIGMAX Gateway fan-out benchmark: the gateway against a plain `websockets` reference.

    python benchmarks/run.py                                  # W1,W2,W3L,W4, 1 rep (~4 min)
    python benchmarks/run.py --workloads W1,W3L --reps 3
    python benchmarks/run.py --quick                          # 3 s windows: a smoke run

For every workload and rep it starts the reference (benchmarks/reference_server.py) and then the
gateway (Hypercorn, the repository's config), each a fresh process pinned to CPU 0, runs the load
generator (benchmarks/loadgen.js, Node) pinned to CPU 1, samples the server's CPU time
(/proc/PID/stat) over the measured window and its RSS (/proc/PID/status VmRSS), and stops the
server by PID (SIGTERM, then SIGKILL). It prints a markdown table with medians over the reps and
the verdict against the targets, and writes it to benchmarks/results/<timestamp>.md (with the raw
loadgen JSON lines next to it). Only loopback addresses; every step is bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
LOADGEN = os.path.join(BENCH, "loadgen.js")
SERVER_CPU, LOADGEN_CPU = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYMBOLS = ",".join(f"S{i:02d}/USDT" for i in range(50))
SERVERS = ("reference", "gateway")

# Workloads: loadgen arguments (durations are replaced by --quick).
WORKLOADS = {
    "W1": dict(
        what="1000 clients on topic market; closed loop, 5 events per POST, <= 10000 deliveries "
             "outstanding; 2 s ramp, 10 s measured",
        args=dict(clients=1000, topics="market", mode="closed", batch=5, window=10000,
                  duration=10, ramp=2, drain=5)),
    "W2": dict(
        what="1000 clients, each on 1 of 50 symbols (20 each); events round-robin over the "
             "symbols, 250 per POST; closed loop; 2 s ramp, 10 s measured",
        args=dict(clients=1000, topics="", symbols=SYMBOLS, mode="closed", batch=250,
                  window=10000, duration=10, ramp=2, drain=5)),
    "W3L": dict(
        what="20 events/s to topic market x 1000 clients (20k deliveries/s), open loop, latency "
             "from the intended send time; 2 s ramp, 10 s measured, then drain",
        args=dict(clients=1000, topics="market", mode="rate", rate=20, batch=5, duration=10,
                  ramp=2, drain=5)),
    "W4": dict(
        what="5000 idle clients subscribed to market; server RSS before connecting them and "
             "after holding them 3 s (20 clients connect, subscribe and leave first, so that "
             "one-time costs of a first connection are not counted per connection)",
        warmup=20,
        args=dict(clients=5000, topics="market", mode="idle", duration=3, settle=2,
                  connect_concurrency=100, connect_timeout=90)),
    "WC": dict(
        what="churn while events flow: 1000 clients on market at 20 events/s for 60 s while 20 "
             "connections per second come and go (each subscribes to market and leaves after "
             "1-5 s, half with a close frame, half dropping the socket); latency of the 1000",
        args=dict(clients=1000, topics="market", mode="rate", rate=20, batch=5, duration=60,
                  ramp=2, drain=5, churn_rate=20, churn_hold_min=1, churn_hold_max=5)),
}
# The 10,000-connection variants of W4 and W3L: the same load with ten times the clients.
WORKLOADS["W4X"] = dict(
    WORKLOADS["W4"], what="W4 with 10,000 idle clients",
    args=dict(WORKLOADS["W4"]["args"], clients=10000, connect_timeout=150))
WORKLOADS["W3X"] = dict(
    WORKLOADS["W3L"],
    what="W3L with 10,000 clients: 20 events/s x 10,000 (200k deliveries/s), open loop",
    args=dict(WORKLOADS["W3L"]["args"], clients=10000, drain=10, connect_concurrency=100,
              connect_timeout=150))
QUICK = {"duration": 3, "ramp": 1, "drain": 3}
# Connections a gateway run may hold: the largest workload, its churn, and reconnects closing.
GATEWAY_MAX_CONNECTIONS = 12000
QUICK_W4 = {"duration": 1, "settle": 1}

# Targets (gateway vs reference of the same run).
W1_RATIO, W1_STRETCH = 0.56, 0.75
W3L_P99_RATIO = 1.5
W4_KB, W4_STRETCH = 20.0, 16.7  # stretch: plain `websockets`' own figure
WC_RATIO = 1.0  # under churn, p99 and max no worse than the reference
LOADGEN_BOUND_PCT = 90.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc sampling
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def sample(pids: list[int]) -> dict:
    """CPU seconds (user+system) and RSS (KB) summed over `pids`, with a monotonic timestamp."""
    cpu, rss = 0.0, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / CLK_TCK
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            pass
    return {"t": time.monotonic(), "cpu": cpu, "rss_kb": rss, "machine": machine_busy()}


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (at most max_wait s) until the machine is below `threshold` % of one core busy."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(0.5)
        busy = 100 * (machine_busy() - b0) / (time.monotonic() - t0)
        if busy <= threshold or time.monotonic() >= deadline:
            return busy


# ------------------------------------------------------------------ processes
def free_port_pair() -> int:
    """Two free consecutive ports below Linux's ephemeral range (32768 and up): a 10,000-client
    run leaves thousands of client ports there in TIME_WAIT or closing."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        ok = True
        for p in (port, port + 1):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def stop(proc: subprocess.Popen | None, name: str, grace: float = 5.0) -> None:
    """SIGTERM the process we started; SIGKILL it and its recorded descendants if still there."""
    if proc is None:
        return
    tree = process_tree(proc.pid) if proc.poll() is None else [proc.pid]
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    for pid in tree:
        if pid == proc.pid and proc.poll() is not None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"warning: {name} (pid {proc.pid}) did not exit")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    return False


# The gateway as the benchmark runs it: the documented command and environment, plus a private
# database in a temporary directory (never the project's own) and no built-in simulation (it would
# publish its own events into the measured streams). --gateway-env overrides or adds variables.
GATEWAY_ENV = {"SIMULATION": "0"}


def prepare_gateway(python: str, env: dict, workdir: str, logf) -> None:
    """Point the gateway at a fresh SQLite file and migrate it when the app has a database."""
    env.setdefault("DATABASE_URL", "sqlite:///" + os.path.join(workdir, "gateway.db"))
    if os.path.exists(os.path.join(ROOT, "app", "__main__.py")):
        r = subprocess.run([python, "-m", "app", "migrate"], cwd=ROOT, env=env, stdout=logf,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
        if r.returncode != 0:
            log(f"    note: `python -m app migrate` exited {r.returncode} (see {logf.name})")


def start_server(kind: str, python: str, logdir: str, tag: str, workdir: str,
                 gateway_env: dict):
    port = free_port_pair()
    logf = open(os.path.join(logdir, f"{tag}-{kind}.log"), "w")
    env = dict(os.environ)
    if kind == "reference":
        cmd = ["taskset", "-c", SERVER_CPU, python, os.path.join(BENCH, "reference_server.py"),
               "--port", str(port)]
        publish = f"http://127.0.0.1:{port + 1}/api/events"
    else:
        hypercorn = os.path.join(os.path.dirname(python), "hypercorn")
        env.update(GATEWAY_ENV)
        env.update(gateway_env)
        env.update(WS_MAX_CONNECTIONS=str(GATEWAY_MAX_CONNECTIONS), PORT=str(port),
                   HOST="127.0.0.1")
        prepare_gateway(python, env, workdir, logf)
        logf.flush()
        cmd = ["taskset", "-c", SERVER_CPU, hypercorn, "--config", "file:hypercorn_config.py",
               "wsgi:app"]
        publish = f"http://127.0.0.1:{port}/api/events"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    logf.close()
    if not wait_ready(f"http://127.0.0.1:{port}/api/health", proc):
        stop(proc, kind)
        raise RuntimeError(f"{kind} did not become ready (log: {logf.name})")
    time.sleep(1.0)  # let the worker settle before the RSS baseline
    return proc, f"ws://127.0.0.1:{port}/api/ws", publish


def gateway_pauses(ws_url: str) -> dict:
    """What stopped the gateway's worker during the run (GET /api/ws/stats): full garbage
    collections, the longest one and the longest event-loop lag; {} if it does not answer."""
    url = ws_url.replace("ws://", "http://", 1) + "/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            stats = json.load(response)
    except (OSError, ValueError):
        return {}
    return {k: stats.get(k) for k in ("gc_full_collections", "gc_pause_max_ms",
                                      "gc_young_pause_max_ms", "event_loop_lag_max_ms")}


def loadgen_args(wl: str, quick: bool) -> list[str]:
    a = dict(WORKLOADS[wl]["args"])
    if quick:
        a.update(QUICK_W4 if a["mode"] == "idle" else QUICK)
    out = []
    for k, v in a.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def warm_up(url: str, clients: int) -> None:
    """A few clients connect, subscribe and leave (first-connection costs out of the baseline)."""
    cmd = ["taskset", "-c", LOADGEN_CPU, "node", LOADGEN, "--url", url, "--clients", str(clients),
           "--mode", "idle", "--duration", "0.2", "--settle", "0.2", "--connect-timeout", "20"]
    try:
        subprocess.run(cmd, cwd=BENCH, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log("    warm-up did not finish within 60 s")
    time.sleep(1.0)


def run_marked_loadgen(url: str, publish: str, wl: str, quick: bool, label: str,
                       sample_at: Callable[[str, int], dict]) -> tuple[dict, dict[str, dict]]:
    """Run the load generator; at each of its phase marks (stderr `@@mark name ms`) record
    `sample_at(name, loadgen_pid)`. Returns (its JSON result, or {"error": ...}; the marks)."""
    cmd = ["taskset", "-c", LOADGEN_CPU, "node", LOADGEN, "--url", url, "--publish-url", publish,
           "--label", label] + loadgen_args(wl, quick)
    proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    marks: dict[str, dict] = {}
    errors: list[str] = []
    out: list[str] = []

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("@@mark "):
                name = line.split()[1]
                marks[name] = sample_at(name, proc.pid)
            elif len(errors) < 50:
                errors.append(line.rstrip())

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)

    threads = [threading.Thread(target=read_err, daemon=True),
               threading.Thread(target=read_out, daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        return {"error": "loadgen did not finish within 240 s"}, marks
    finally:
        if proc.poll() is None:
            stop(proc, "loadgen", grace=1)
    for t in threads:
        t.join(timeout=5)
    lines = [x for x in out if x.startswith("{")]
    if not lines:
        return {"error": f"loadgen exit {proc.returncode}: {' | '.join(errors[-3:])[:300]}"}, marks
    r = json.loads(lines[-1])
    r["loadgen_exit"] = proc.returncode
    return r, marks


def run_loadgen(url: str, publish: str, server: subprocess.Popen, wl: str, quick: bool,
                label: str) -> dict:
    """Run the load generator; sample the server at its phase marks."""
    if WORKLOADS[wl].get("warmup"):
        warm_up(url, WORKLOADS[wl]["warmup"])

    def sample_at(name: str, loadgen_pid: int) -> dict:
        m = sample(process_tree(server.pid))
        m["loadgen"] = sample([loadgen_pid])["cpu"]
        return m

    r, marks = run_marked_loadgen(url, publish, wl, quick, label, sample_at)
    if "error" in r:
        return r
    a, b = marks.get("measure-start"), marks.get("measure-end")
    if a and b and b["t"] > a["t"]:
        dt = b["t"] - a["t"]
        r["server_cpu_pct"] = round(100 * (b["cpu"] - a["cpu"]) / dt, 1)
        # CPU used by anything else on the machine during the window (noise), % of one core
        r["other_cpu_pct"] = round(100 * ((b["machine"] - a["machine"]) - (b["cpu"] - a["cpu"])
                                          - (b["loadgen"] - a["loadgen"])) / dt, 1)
    before, after = marks.get("connect-start"), marks.get("measure-end")
    if before and after:
        r["server_rss_kb_before"] = before["rss_kb"]
        r["server_rss_kb_after"] = after["rss_kb"]
        if r.get("subscribed"):
            r["kb_per_conn"] = round((after["rss_kb"] - before["rss_kb"]) / r["subscribed"], 2)
    return r


# ------------------------------------------------------------------ table
def med(rows: list[dict], key: str, sub: str | None = None):
    vals = []
    for r in rows:
        v = r.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.append(v)
    return statistics.median(vals) if vals else None


def worst(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return max(vals) if vals else None


def paired_ratio(results: list[dict], wl: str, key: str, sub: str | None = None):
    """Median over reps of gateway/reference, each rep against the reference of the same rep."""
    ratios = []
    for rep in sorted({r["_rep"] for r in results}):
        pair = {}
        for r in results:
            if r["_workload"] == wl and r["_rep"] == rep and "error" not in r:
                v = r.get(key)
                pair[r["_server"]] = v.get(sub) if sub and isinstance(v, dict) else v
        g, ref = pair.get("gateway"), pair.get("reference")
        if isinstance(g, (int, float)) and isinstance(ref, (int, float)) and ref > 0:
            ratios.append(g / ref)
    return statistics.median(ratios) if ratios else None


def num(v, nd: int = 0) -> str:
    if v is None:
        return "-"
    if nd == 0:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def verdict(wl: str, ratio, p99_ratio, kb, mis, max_ratio=None) -> str:
    if wl in ("W1", "W2"):
        if ratio is None:
            return "n/a"
        ok = ratio >= W1_RATIO
        text = f"{'PASS' if ok else 'FAIL'}: {ratio:.2f}x vs >= {W1_RATIO}x"
        if ok:
            text += f", stretch {W1_STRETCH}x {'met' if ratio >= W1_STRETCH else 'not met'}"
        if wl == "W2":
            if mis is None:
                return text + "; misrouted n/a"
            if mis > 0:
                return f"FAIL: {num(mis)} misrouted; " + text.split(": ", 1)[1]
            text += ", 0 misrouted"
        return text
    if wl == "WC":
        if p99_ratio is None or max_ratio is None:
            return "n/a"
        ok = p99_ratio <= WC_RATIO and max_ratio <= WC_RATIO
        return (f"{'PASS' if ok else 'FAIL'}: p99 {p99_ratio:.2f}x, max {max_ratio:.2f}x vs "
                f"<= {WC_RATIO:g}x")
    if wl in ("W3L", "W3X"):
        if p99_ratio is None:
            return "n/a"
        ok = p99_ratio <= W3L_P99_RATIO
        return f"{'PASS' if ok else 'FAIL'}: p99 {p99_ratio:.2f}x vs <= {W3L_P99_RATIO}x"
    if wl in ("W4", "W4X"):
        if kb is None:
            return "n/a"
        ok = kb <= W4_KB
        text = f"{'PASS' if ok else 'FAIL'}: {kb:.1f} KB vs <= {W4_KB:g}"
        if ok:
            text += f", stretch {W4_STRETCH:g} {'met' if kb <= W4_STRETCH else 'not met'}"
        return text
    return "-"


def notes(rows: list[dict], clients: int) -> str:
    n = []
    if any("error" in r for r in rows):
        n.append("error: " + "; ".join(r["error"] for r in rows if "error" in r)[:160])
    ok = [r for r in rows if "error" not in r]
    fails = worst(ok, "connect_failures")
    if fails:
        reasons: dict[str, int] = {}
        for r in ok:
            for k, v in (r.get("connect_fail_reasons") or {}).items():
                reasons[k] = max(reasons.get(k, 0), v)
        n.append(f"{num(fails)}/{clients} not connected {json.dumps(reasons)}")
    if worst(ok, "churn_started"):
        n.append(f"churn: {num(worst(ok, 'churn_subscribed'))} of "
                 f"{num(worst(ok, 'churn_started'))} subscribed, "
                 f"{num(worst(ok, 'churn_failed'))} failed")
    if worst(ok, "closed_during_run"):
        n.append(f"{num(worst(ok, 'closed_during_run'))} closed during run "
                 f"{json.dumps(ok[0].get('close_codes') or {})}")
    if worst(ok, "post_errors"):
        n.append(f"{num(worst(ok, 'post_errors'))} POST errors")
    if worst(ok, "stalls"):
        n.append(f"{num(worst(ok, 'stalls'))} stalls (window written off)")
    if worst(ok, "invalid_events") or worst(ok, "unparsed_msgs"):
        n.append("unparsable/invalid events")
    if worst(ok, "slow_path_msgs"):
        n.append(f"{num(worst(ok, 'slow_path_msgs'))} events not in the published layout "
                 "(parsed as JSON)")
    lg, srv = med(ok, "loadgen_cpu_pct"), med(ok, "server_cpu_pct")
    if lg is not None and lg > LOADGEN_BOUND_PCT and srv is not None and srv >= 95:
        n.append(f"server saturated too ({srv:.0f}%)")
    if any(r.get("drained") is False for r in ok):
        n.append("drain incomplete")
    other = med(ok, "other_cpu_pct")
    if other is not None and other > 15:
        n.append(f"noisy: other processes {other:.0f}% CPU")
    return "; ".join(n) or "-"


def table(results: list[dict], wls: list[str]) -> str:
    head = ("| workload | server | delivered/s | ratio | p50 ms | p99 ms | p99 ratio | p99.9 ms | "
            "max ms | server CPU % | loadgen CPU % | KB/conn | lost | dup | misrouted | verdict | notes |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for wl in wls:
        idle = WORKLOADS[wl]["args"]["mode"] == "idle"
        clients = WORKLOADS[wl]["args"]["clients"]
        ratio = None if idle else paired_ratio(results, wl, "delivered_per_s")
        p99_ratio = None if idle else paired_ratio(results, wl, "latency_ms", "p99")
        max_ratio = None if idle else paired_ratio(results, wl, "latency_ms", "max")
        for server in SERVERS:
            rows = [r for r in results if r["_workload"] == wl and r["_server"] == server]
            ok = [r for r in rows if "error" not in r]
            lg = med(ok, "loadgen_cpu_pct")
            lg_text = "-" if lg is None else f"{lg:.0f}" + (
                " loadgen-bound" if lg > LOADGEN_BOUND_PCT else "")
            kb = med(ok, "kb_per_conn") if idle else None
            mis = worst(ok, "misrouted")
            is_gw = server == "gateway"

            def rel(value, idle=idle, is_gw=is_gw):
                if idle:
                    return "-"
                if not is_gw:
                    return "1.00x (ref)"
                return f"{value:.2f}x" if value else "-"

            cells = [
                wl, server,
                "-" if idle else num(med(ok, "delivered_per_s")),
                rel(ratio),
                "-" if idle else num(med(ok, "latency_ms", "p50"), 2),
                "-" if idle else num(med(ok, "latency_ms", "p99"), 2),
                rel(p99_ratio),
                "-" if idle else num(med(ok, "latency_ms", "p999"), 2),
                "-" if idle else num(med(ok, "latency_ms", "max"), 2),
                num(med(ok, "server_cpu_pct")),
                lg_text,
                num(kb, 1) if idle else "-",
                "-" if idle else num(worst(ok, "lost")),
                "-" if idle else num(worst(ok, "duplicates")),
                "-" if idle else num(mis),
                verdict(wl, ratio, p99_ratio, kb, mis, max_ratio) if is_gw else "reference",
                notes(rows, clients),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = f"""\
delivered/s: deliveries received by all clients per second of the measured window (median over
reps). ratio, p99 ratio: gateway / reference of the same rep (median over reps). p50/p99: latency
from the event's intended publish time to its arrival, over every delivery of the events published
in the window (no sampling, 0.01 ms buckets). server CPU %: the server's process tree over the
window, % of one core (it is pinned to one). loadgen CPU %: the load generator's own CPU over the
window; `loadgen-bound` above {LOADGEN_BOUND_PCT:g} % (the server may then be faster than shown).
KB/conn (W4): (RSS after connecting and holding - RSS before) / subscribed clients. lost, dup,
misrouted: worst rep; lost = expected - unique received after the drain, per client; dup = the same
event id twice at one client; misrouted = an event the client's subscriptions do not cover.
Targets: W1 and W2 delivered/s >= {W1_RATIO}x the reference (stretch {W1_STRETCH}x), W2 also zero
misrouted; W3L and W3X p99 <= {W3L_P99_RATIO}x the reference's; W4 and W4X <= {W4_KB:g} KB per
connection (stretch {W4_STRETCH:g}); WC p99 and max <= {WC_RATIO:g}x the reference's. p99.9 and max
ms: the same latency, its 99.9th percentile and its largest value."""


# ------------------------------------------------------------------ main
def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The options run.py and scale.py share."""
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 s windows (1 s ramp): a smoke run")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                    help="interpreter (with hypercorn next to it) for the servers")
    ap.add_argument("--results", default=os.path.join(BENCH, "results"))
    ap.add_argument("--quiet-wait", type=float, default=10,
                    help="max s to wait before each run for other load to drop (default 10)")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the gateway (repeatable)")


def check_common_arguments(a: argparse.Namespace) -> dict[str, str]:
    """Exit with the reason unless the shared options and the machine are usable; returns the
    --gateway-env settings."""
    gateway_env = {}
    for item in a.gateway_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            sys.exit(f"--gateway-env {item!r}: expected NAME=VALUE")
        gateway_env[name] = value
    if not 1 <= a.reps <= 20:
        sys.exit("--reps must be 1..20")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs (server on CPU 0, load generator on CPU 1)")
    for tool in ("taskset", "node"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    a.python = os.path.abspath(a.python)
    if not os.path.exists(a.python) or not os.path.exists(
            os.path.join(os.path.dirname(a.python), "hypercorn")):
        sys.exit(f"{a.python} (with hypercorn) not found: run `make test` first")
    return gateway_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3L,W4", help="comma list of " + ",".join(WORKLOADS))
    add_common_arguments(ap)
    a = ap.parse_args()
    gateway_env = check_common_arguments(a)

    wls = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in wls:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w}; known: {', '.join(WORKLOADS)}")

    # 5000 clients + 5000 server sockets: raise the open-files limit for us and the children
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    most = max(WORKLOADS[w]["args"]["clients"] for w in wls)
    if want < 2 * most + 2000:
        log(f"warning: open-files limit {want} is low for {most} clients")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(a.results, exist_ok=True)
    logdir = os.path.join(a.results, f"{stamp}-logs")
    os.makedirs(logdir, exist_ok=True)
    raw_path = os.path.join(a.results, f"{stamp}.jsonl")
    results: list[dict] = []
    t0 = time.monotonic()
    with open(raw_path, "w") as raw:
        for rep in range(1, a.reps + 1):
            for wl in wls:
                for server in SERVERS:
                    label = f"{wl}/{server}/rep{rep}"
                    busy = wait_quiet(a.quiet_wait, 25)
                    log(f"[{time.monotonic() - t0:6.1f}s] {label} (machine busy before: "
                        f"{busy:.0f}% of a core)")
                    proc = None
                    workdir = tempfile.mkdtemp(prefix="sigmax-bench-")
                    try:
                        proc, url, publish = start_server(server, a.python, logdir,
                                                          f"{wl}-rep{rep}", workdir, gateway_env)
                        r = run_loadgen(url, publish, proc, wl, a.quick, label)
                        if server == "gateway":
                            r["pauses"] = gateway_pauses(url)
                    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                        r = {"error": str(error)}
                    finally:
                        stop(proc, server)
                        shutil.rmtree(workdir, ignore_errors=True)
                    r.update(_workload=wl, _server=server, _rep=rep, _busy_before=round(busy))
                    results.append(r)
                    raw.write(json.dumps(r) + "\n")
                    raw.flush()
                    if "error" in r:
                        log(f"    ERROR {r['error']}")
                    else:
                        lat = r.get("latency_ms") or {}
                        log(f"    delivered/s={r.get('delivered_per_s')} p50={lat.get('p50')} "
                            f"p99={lat.get('p99')} serverCPU={r.get('server_cpu_pct')}% "
                            f"loadgenCPU={r.get('loadgen_cpu_pct')}% subscribed={r.get('subscribed')} "
                            f"lost={r.get('lost')} dup={r.get('duplicates')} "
                            f"misrouted={r.get('misrouted')}"
                            + (f" KB/conn={r.get('kb_per_conn')}" if "kb_per_conn" in r else "")
                            + "".join(f" {k}={v}" for k, v in (r.get("pauses") or {}).items()))

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    header = (f"# Fan-out benchmark {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
              f"gateway commit {commit}; {os.cpu_count()} CPUs, servers on CPU {SERVER_CPU}, "
              f"load generator on CPU {LOADGEN_CPU}; node {node}; reps {a.reps}"
              f"{' (quick: 3 s windows)' if a.quick else ''}; took {time.monotonic() - t0:.0f} s; "
              f"raw: {os.path.relpath(raw_path, ROOT)}\n\n"
              f"gateway: `hypercorn --config file:hypercorn_config.py wsgi:app` with "
              f"WS_MAX_CONNECTIONS={GATEWAY_MAX_CONNECTIONS} "
              + " ".join(f"{k}={v}" for k, v in {**GATEWAY_ENV, **gateway_env}.items())
              + " and a fresh SQLite DATABASE_URL per run (migrated first when the app has "
              "`python -m app migrate`); reference: benchmarks/reference_server.py\n")
    workloads = "\n".join(f"- {w}: {WORKLOADS[w]['what']}" for w in wls)
    text = f"{header}\n{workloads}\n\n{table(results, wls)}\n\n{LEGEND}\n"
    out_path = os.path.join(a.results, f"{stamp}.md")
    with open(out_path, "w") as f:
        f.write(text)
    print(text)
    log(f"written {os.path.relpath(out_path, ROOT)}")


if __name__ == "__main__":
    main()
