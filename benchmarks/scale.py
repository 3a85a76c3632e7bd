#!/usr/bin/env python3
"""Scale-out benchmark: the gateway with 1 worker in memory, 1 worker with Redis, 2 with Redis.

    python benchmarks/scale.py                                 # W1 and W3L, 1 rep (~2 min)
    python benchmarks/scale.py --reps 3                        # medians over 3 reps
    python benchmarks/scale.py --quick                         # 3 s windows: a smoke run
    python benchmarks/scale.py --redis-url redis://127.0.0.1:6379/0

Same workloads and load generator parameters as run.py's W1 (1000 clients on `market`, closed
loop, as fast as delivered) and W3L (20 events/s x 1000 clients, open loop, latency below
capacity). For every workload, rep and configuration it starts a fresh gateway (run.py's
`start_server`: Hypercorn with the repository's config, a fresh migrated SQLite database,
SIMULATION=0), with a REDIS_PREFIX of its own when it uses Redis, runs the load generator, samples
CPU at the load generator's phase marks, stops the gateway by PID and deletes the run's Redis keys.

Every gateway process (Hypercorn's supervisor and all its workers) is pinned to CPU 0 and the load
generator to CPU 1, as in run.py. So 2 workers share one core with each other: the 2-worker row
shows what splitting the clients over two processes and reading the stream twice costs, not what a
second core would add. Redis is shared and is not pinned by this script; its CPU is sampled from
/proc when its pid (INFO server process_id) is visible here.

The table goes to stdout and to benchmarks/results/<timestamp>-scale.md, the raw load generator
JSON lines to <timestamp>-scale.jsonl, server logs to <timestamp>-scale-logs/.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (benchmarks/run.py: server start/stop, /proc sampling, loadgen args)
from run import (  # noqa: E402
    LOADGEN_BOUND_PCT,
    LOADGEN_CPU,
    ROOT,
    SERVER_CPU,
    WORKLOADS,
    add_common_arguments,
    check_common_arguments,
    log,
    med,
    notes,
    num,
    process_tree,
    run_marked_loadgen,
    sample,
    start_server,
    stop,
    wait_quiet,
    worst,
)

WLS = ("W1", "W3L")
# (label, WORKERS, uses Redis)
CONFIGS = (
    ("1 worker, in-memory", 1, False),
    ("1 worker, Redis", 1, True),
    ("2 workers, Redis", 2, True),
)
BASELINE = CONFIGS[0][0]

# Run with the venv's interpreter (it has the `redis` package the gateway uses), so this script
# itself needs only the standard library, like run.py.
REDIS_HELPER = r"""
import json, sys
import redis
url, action, prefix = sys.argv[1:4]
r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
if action == "ping":
    r.ping()
    info = r.info("server")
    print(json.dumps({"version": info.get("redis_version"), "pid": info.get("process_id"),
                      "port": info.get("tcp_port")}))
else:
    keys = list(r.scan_iter(match=prefix + ":*", count=1000))
    seq = r.get(prefix + ":seq")
    print(json.dumps({"seq": int(seq) if seq is not None else None,
                      "deleted": r.delete(*keys) if keys else 0,
                      "keys": sorted(k.decode() for k in keys)}))
"""


def redis_call(python: str, url: str, action: str, prefix: str = "") -> dict:
    r = subprocess.run([python, "-c", REDIS_HELPER, url, action, prefix], capture_output=True,
                       text=True, timeout=20, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def redis_pid(info: dict) -> int | None:
    """The redis-server's pid when it is a process on this machine that /proc lets us read."""
    candidates = []
    if isinstance(info.get("pid"), int):
        candidates.append(info["pid"])
    try:  # Redis in another PID namespace (a container): fall back to the only local one
        found = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True,
                               timeout=5).stdout.split()
        if len(found) == 1:
            candidates.append(int(found[0]))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith("redis-server"):
                    with open(f"/proc/{pid}/stat"):
                        return pid
        except OSError:
            continue
    return None


def affinity(pid: int) -> str:
    try:
        cpus = sorted(os.sched_getaffinity(pid))
    except OSError:
        return "?"
    return "all CPUs" if len(cpus) == os.cpu_count() else "CPU " + ",".join(map(str, cpus))


# ------------------------------------------------------------------ gateway processes
def worker_pids(master: int) -> list[int]:
    """Hypercorn's worker processes (multiprocessing spawn children) under the supervisor."""
    out = []
    for pid in process_tree(master):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return sorted(out)


def wait_workers(logpath: str, proc: subprocess.Popen, workers: int, timeout: float = 20.0) -> bool:
    """Every worker logs `Running on` once its app has started (bus connected); wait for all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(logpath, errors="replace") as f:
                if f.read().count("Running on") >= workers:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def connections_per_worker(port: int, pids: list[int]) -> list[int]:
    """Established TCP connections on the gateway's port held by each worker (clients + POSTs)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    p = line.split()
                    if len(p) > 9 and p[3] == "01" and int(p[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(p[9])
        except (OSError, ValueError):
            pass
    counts = []
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        counts.append(n)
    return counts


# ------------------------------------------------------------------ one measured run
def measure(url: str, publish: str, server: subprocess.Popen, port: int, wl: str, quick: bool,
            label: str, rpid: int | None, uses_redis: bool) -> dict:
    """Run the load generator; at its phase marks sample the gateway's process tree (in total and
    per worker), the load generator, Redis and the machine, as run.run_loadgen does for the tree."""
    workers = worker_pids(server.pid)

    def sample_at(name: str, loadgen_pid: int) -> dict:
        m = sample(process_tree(server.pid))
        m["workers"] = [sample([w])["cpu"] for w in workers]
        m["loadgen"] = sample([loadgen_pid])["cpu"]
        m["redis"] = sample([rpid])["cpu"] if rpid else None
        if name == "connected":
            m["conns"] = connections_per_worker(port, workers)
        return m

    r, marks = run_marked_loadgen(url, publish, wl, quick, label, sample_at)
    if "error" in r:
        return r
    r["workers"] = len(workers)
    if "connected" in marks:
        r["conns_per_worker"] = marks["connected"]["conns"]
    a, b = marks.get("measure-start"), marks.get("measure-end")
    if a and b and b["t"] > a["t"]:
        dt = b["t"] - a["t"]
        server_cpu = b["cpu"] - a["cpu"]
        r["server_cpu_pct"] = round(100 * server_cpu / dt, 1)
        r["worker_cpu_pct"] = [round(100 * (y - x) / dt, 1)
                               for x, y in zip(a["workers"], b["workers"], strict=True)]
        redis_cpu = 0.0
        if a["redis"] is not None and b["redis"] is not None:
            redis_cpu = b["redis"] - a["redis"]
            r["redis_cpu_pct"] = round(100 * redis_cpu / dt, 1)
        # Everything else on the machine during the window (noise). Redis is part of the system
        # under test only in the Redis configurations.
        mine = server_cpu + (b["loadgen"] - a["loadgen"]) + (redis_cpu if uses_redis else 0.0)
        r["other_cpu_pct"] = round(100 * ((b["machine"] - a["machine"]) - mine) / dt, 1)
    return r


# ------------------------------------------------------------------ table
def paired_ratio(results: list[dict], wl: str, config: str, key: str, sub: str | None = None):
    """Median over reps of config / 1-worker in-memory, each against the baseline of its rep."""
    def value(r: dict):
        v = r.get(key)
        return v.get(sub) if sub and isinstance(v, dict) else v

    ratios = []
    for rep in sorted({r["_rep"] for r in results}):
        pair = {r["_config"]: value(r) for r in results
                if r["_workload"] == wl and r["_rep"] == rep and "error" not in r}
        x, base = pair.get(config), pair.get(BASELINE)
        if isinstance(x, (int, float)) and isinstance(base, (int, float)) and base > 0:
            ratios.append(x / base)
    return statistics.median(ratios) if ratios else None


def med_list(rows: list[dict], key: str) -> list[float] | None:
    """Element-wise median of per-worker lists (rows with the same number of workers)."""
    lists = [r[key] for r in rows if isinstance(r.get(key), list) and r[key]]
    if not lists or len({len(x) for x in lists}) != 1:
        return None
    return [statistics.median(col) for col in zip(*lists, strict=True)]


def workload_table(results: list[dict], wl: str) -> str:
    head = ("| configuration | delivered/s | ratio | p50 ms | p99 ms | p99 ratio | server CPU % "
            "| per worker CPU % | conns per worker | Redis CPU % | loadgen CPU % | lost | dup "
            "| flags / notes |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    clients = WORKLOADS[wl]["args"]["clients"]
    for config, _, _ in CONFIGS:
        rows = [r for r in results if r["_workload"] == wl and r["_config"] == config]
        ok = [r for r in rows if "error" not in r]
        base = config == BASELINE

        def rel(value, base=base):
            if base:
                return "1.00x (base)"
            return "-" if value is None else f"{value:.2f}x"

        per_worker = med_list(ok, "worker_cpu_pct")
        conns = med_list(ok, "conns_per_worker")
        lg = med(ok, "loadgen_cpu_pct")
        flags = []
        if lg is not None and lg > LOADGEN_BOUND_PCT:
            flags.append("loadgen-bound")
        for r in ok:  # with Redis, every published event must have gone through the stream
            if "redis_seq" in r and r["redis_seq"] != r.get("events_published"):
                flags.append(f"Redis seq {r['redis_seq']} != {r.get('events_published')} "
                             f"published (rep {r['_rep']})")
        if worst(ok, "misrouted"):
            flags.append(f"{num(worst(ok, 'misrouted'))} misrouted")
        note = notes(rows, clients)
        if note != "-":
            flags.append(note)
        cells = [
            config,
            num(med(ok, "delivered_per_s")),
            rel(paired_ratio(results, wl, config, "delivered_per_s")),
            num(med(ok, "latency_ms", "p50"), 2),
            num(med(ok, "latency_ms", "p99"), 2),
            rel(paired_ratio(results, wl, config, "latency_ms", "p99")),
            num(med(ok, "server_cpu_pct")),
            "-" if per_worker is None else " + ".join(f"{v:.0f}" for v in per_worker),
            "-" if conns is None else " / ".join(f"{v:.0f}" for v in conns),
            num(med(ok, "redis_cpu_pct")) if "Redis" in config else "-",
            "-" if lg is None else f"{lg:.0f}",
            num(worst(ok, "lost")),
            num(worst(ok, "duplicates")),
            "; ".join(flags) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = f"""\
- delivered/s: deliveries received by all clients per second of the measured window.
- ratio: delivered/s / the 1-worker in-memory gateway's, same rep and workload.
- p50, p99: latency from the event's (intended) publish time to its arrival at a client, over
  every delivery of the events published in the window.
- p99 ratio: p99 / the 1-worker in-memory p99, same rep and workload.
- server CPU %: the gateway's whole process tree (Hypercorn supervisor and workers) over the
  window, in % of one core. Every gateway process is pinned to CPU {SERVER_CPU}, so about 100 means
  that core is saturated, whatever the number of workers. per worker CPU %: the same per worker.
- conns per worker: the WebSocket clients each worker holds, counted once all had subscribed (the
  kernel spreads the accepts over the workers).
- Redis CPU %: the redis-server process over the window. It is shared and not pinned, so other
  Redis users count too.
- loadgen CPU %: the load generator on CPU {LOADGEN_CPU}, flagged `loadgen-bound` above
  {LOADGEN_BOUND_PCT:g} % (the gateway may then be faster than shown).
- lost: expected - unique received after the drain, summed over clients; dup: the same event id
  twice at one client. Both are the worst rep. A Redis run is also flagged when the stream's
  counter (`REDIS_PREFIX:seq`) differs from the number of events published.
- Other columns are medians over the reps; ratios are medians of the per-rep ratios."""


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    extra_env = check_common_arguments(a)
    for name in ("WORKERS", "REDIS_URL", "REDIS_PREFIX"):
        if name in extra_env:
            sys.exit(f"--gateway-env {name}: set by the configurations")

    try:
        rinfo = redis_call(a.python, a.redis_url, "ping")
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
        sys.exit(f"Redis is not reachable at {a.redis_url}: {error}\n"
                 "The Redis configurations need it. Start one (for example "
                 "`redis-server --port 6379 --save '' --daemonize yes`) or pass --redis-url.")
    rpid = redis_pid(rinfo)
    log(f"Redis {rinfo.get('version')} at {a.redis_url}: reachable; "
        + (f"redis-server pid {rpid} ({affinity(rpid)}), CPU sampled" if rpid
           else "its process is not visible here: no Redis CPU column"))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(a.results, exist_ok=True)
    logdir = os.path.join(a.results, f"{stamp}-scale-logs")
    os.makedirs(logdir, exist_ok=True)
    raw_path = os.path.join(a.results, f"{stamp}-scale.jsonl")
    results: list[dict] = []
    leftover: list[str] = []
    t0 = time.monotonic()
    n = 0
    with open(raw_path, "w") as raw:
        for rep in range(1, a.reps + 1):
            for wl in WLS:
                # rotate the order per rep so that no configuration always runs first
                order = CONFIGS[(rep - 1) % 3:] + CONFIGS[:(rep - 1) % 3]
                for config, workers, uses_redis in order:
                    n += 1
                    label = f"{wl}/{config}/rep{rep}"
                    env = dict(extra_env, WORKERS=str(workers))
                    prefix = None
                    if uses_redis:
                        prefix = f"sigmax-bench-scale-{stamp}-{n}"
                        env.update(REDIS_URL=a.redis_url, REDIS_PREFIX=prefix)
                    busy = wait_quiet(a.quiet_wait, 25)
                    log(f"[{time.monotonic() - t0:6.1f}s] {label} (machine busy before: "
                        f"{busy:.0f}% of a core)")
                    proc = None
                    workdir = tempfile.mkdtemp(prefix="sigmax-bench-")
                    tag = f"{wl}-rep{rep}-w{workers}{'-redis' if uses_redis else ''}"
                    try:
                        proc, url, publish = start_server("gateway", a.python, logdir, tag,
                                                          workdir, env)
                        logpath = os.path.join(logdir, f"{tag}-gateway.log")
                        if not wait_workers(logpath, proc, workers):
                            raise RuntimeError(f"not all {workers} workers started ({logpath})")
                        port = int(url.rsplit(":", 1)[1].split("/")[0])
                        r = measure(url, publish, proc, port, wl, a.quick, label, rpid,
                                    uses_redis)
                    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                        r = {"error": str(error)}
                    finally:
                        stop(proc, "gateway")
                        shutil.rmtree(workdir, ignore_errors=True)
                        if prefix:
                            try:
                                gone = redis_call(a.python, a.redis_url, "clean", prefix)
                                r_keys, r_seq = gone["keys"], gone["seq"]
                            except (RuntimeError, subprocess.TimeoutExpired, OSError,
                                    ValueError) as error:
                                r_keys, r_seq = [], None
                                leftover.append(f"{prefix}:* ({error})")
                    r.update(_workload=wl, _config=config, _rep=rep, _workers=workers,
                             _redis_prefix=prefix, _busy_before=round(busy))
                    if prefix:
                        # the stream's counter: how many events went through Redis
                        r["_redis_keys_deleted"], r["redis_seq"] = r_keys, r_seq
                    results.append(r)
                    raw.write(json.dumps(r) + "\n")
                    raw.flush()
                    if "error" in r:
                        log(f"    ERROR {r['error']}")
                    else:
                        lat = r.get("latency_ms") or {}
                        log(f"    delivered/s={r.get('delivered_per_s')} p50={lat.get('p50')} "
                            f"p99={lat.get('p99')} serverCPU={r.get('server_cpu_pct')}% "
                            f"workers={r.get('worker_cpu_pct')} conns={r.get('conns_per_worker')} "
                            f"redisCPU={r.get('redis_cpu_pct')}% "
                            f"loadgenCPU={r.get('loadgen_cpu_pct')}% "
                            f"subscribed={r.get('subscribed')} lost={r.get('lost')} "
                            f"dup={r.get('duplicates')}")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    env_text = " ".join(f"{k}={v}" for k, v in {**run.GATEWAY_ENV, **extra_env}.items())
    header = (
        f"# Scale-out benchmark {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
        f"gateway commit {commit}; {os.cpu_count()} CPUs; node {node}; reps {a.reps}"
        f"{' (quick: 3 s windows)' if a.quick else ''}; took {time.monotonic() - t0:.0f} s; "
        f"raw: {os.path.relpath(raw_path, ROOT)}\n\n"
        f"**CPU placement: every gateway process (Hypercorn supervisor and all workers, in every "
        f"configuration) is pinned to CPU {SERVER_CPU}; the load generator has CPU {LOADGEN_CPU}. "
        f"The 2 workers therefore share one core: that row measures the cost of the split and of "
        f"the Redis hop, not the gain of a second core.** Redis {rinfo.get('version')} at "
        f"{a.redis_url} is shared and not pinned by the benchmark ("
        + (f"pid {rpid}, affinity {affinity(rpid)}" if rpid else "pid not visible: not sampled")
        + ").\n\n"
        f"gateway: `hypercorn --config file:hypercorn_config.py wsgi:app` with "
        f"WS_MAX_CONNECTIONS=6000 {env_text}, a fresh migrated SQLite DATABASE_URL per run, and "
        f"per configuration WORKERS=1 (in-memory bus), WORKERS=1 REDIS_URL=..., WORKERS=2 "
        f"REDIS_URL=...; each Redis run has a REDIS_PREFIX of its own "
        f"(`sigmax-bench-scale-<stamp>-<n>`), whose keys are deleted after the run"
        + (f"; NOT deleted: {', '.join(leftover)}" if leftover else "")
        + ". With Redis each event is XADDed once and every worker reads the stream and "
          "delivers to its own clients.\n")
    parts = [header]
    for wl in WLS:
        parts.append(f"## {wl}: {WORKLOADS[wl]['what']}\n\n{workload_table(results, wl)}\n")
    parts.append(LEGEND + "\n")
    text = "\n".join(parts)
    out_path = os.path.join(a.results, f"{stamp}-scale.md")
    with open(out_path, "w") as f:
        f.write(text)
    print(text)
    log(f"written {os.path.relpath(out_path, ROOT)}")


if __name__ == "__main__":
    main()
