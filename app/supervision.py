"""The supervised deployment: each worker a process of its own under supervisord (PyPI's
`supervisor`), each on a socket of its own bound to HOST:PORT with SO_REUSEPORT
(deploy/supervisord.conf). A worker that dies is started again alone; the others keep their
connections.

    python -m app supervise            # serve, WORKERS processes, until SIGTERM or SIGINT
    python -m app rolling-restart      # one worker at a time: new code without an outage
    python -m app serve-worker         # one worker (what supervisord runs WORKERS times)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from typing import Any

from config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, "deploy", "supervisord.conf")
GROUP = "sigmax"  # the program's name in CONFIG_FILE
# How long a restarted worker may take to answer /api/health before a rolling restart stops.
READY_TIMEOUT = 30.0


def run_dir() -> str:
    """Where supervisord keeps its socket, its logs and the workers' metrics files."""
    return os.path.abspath(os.environ.get("SIGMAX_RUN_DIR") or os.path.join(ROOT, "run"))


def supervise(config: Config) -> None:
    """Replace this process with supervisord serving the gateway (never returns)."""
    config.hypercorn_settings()  # refuses WORKERS > 1 without REDIS_URL, as Hypercorn's does
    directory = run_dir()
    metrics = os.path.join(directory, "metrics")
    # prometheus_client's files of an earlier run would be summed with this one's.
    shutil.rmtree(metrics, ignore_errors=True)
    os.makedirs(metrics)
    env = {
        **os.environ,
        "SIGMAX_RUN_DIR": directory,
        "SIGMAX_ROOT": ROOT,
        "SIGMAX_PYTHON": sys.executable,
        "PROMETHEUS_MULTIPROC_DIR": metrics,
        "HOST": config.HOST,
        "PORT": str(config.PORT),
        "WORKERS": str(config.WORKERS),
    }
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", CONFIG_FILE]
    os.execve(sys.executable, command, env)


def serve_worker(config: Config) -> None:
    """Replace this process with one Hypercorn worker (never returns), listening on a socket of
    its own bound to HOST:PORT with SO_REUSEPORT, as every other worker's is: the kernel spreads
    new connections evenly over the workers. (One socket shared by every worker let the first to
    wake take nearly all: 30 clients of 3 workers were 30/0/0.)"""
    host = config.HOST.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, config.PORT))
    sock.listen(int(config.hypercorn_settings()["backlog"]))
    sock.set_inheritable(True)
    command = [sys.executable, "-m", "hypercorn", "--config", "file:hypercorn_config.py"]
    command += ["--bind", f"fd://{sock.fileno()}", "--workers", "0", "wsgi:app"]
    os.chdir(ROOT)
    os.execv(sys.executable, command)


def _rpc(directory: str | None = None) -> Any:
    """supervisord's XML-RPC interface, over its unix socket in `directory` (run_dir())."""
    from supervisor.xmlrpc import SupervisorTransport

    socket = os.path.join(directory or run_dir(), "supervisor.sock")
    transport = SupervisorTransport(None, None, f"unix://{socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def workers(directory: str | None = None) -> list[dict[str, Any]]:
    """supervisord's view of each worker process: name, statename, pid, ..."""
    return [p for p in _rpc(directory).getAllProcessInfo() if p["group"] == GROUP]


def _health_of(config: Config, pid: int, timeout: float) -> dict[str, Any]:
    """/api/health as answered by the worker `pid` (through the shared socket: polled until
    that worker is the one that accepts), within `timeout` seconds."""
    host = "127.0.0.1" if config.HOST in ("0.0.0.0", "::", "") else config.HOST
    url = f"{'https' if config.tls else 'http'}://{host}:{config.PORT}/api/health"
    # Its own workers on this host, by address: the certificate names the public host, not
    # this address, and proves nothing here.
    context = ssl._create_unverified_context() if config.tls else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                health: dict[str, Any] = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            health = {}
        if health.get("worker", "").endswith(f":{pid}") and health.get("status") == "ok":
            return health
        time.sleep(0.05)
    raise TimeoutError(f"worker pid {pid} did not answer /api/health ok within {timeout:g} s")


def say(line: str) -> None:
    """A progress line, at once (a pipe would otherwise hold it until the command ends)."""
    print(line, flush=True)


def rolling_restart(config: Config, report: Any = say) -> None:
    """Restart the workers one at a time, each only once the one before answers /api/health:
    at every moment all but one serve. A stopped worker's clients are told and closed with
    1001, and resume on the others.

    However it ends (done, Ctrl-C, SIGTERM from systemd's reload timeout, a worker that does not
    come back healthy), every worker is left started: a worker an interrupted restart had
    stopped is started again, here or by the next run."""
    rpc = _rpc()
    names = [f"{GROUP}:{process['name']}" for process in workers()]
    previous = signal.signal(signal.SIGTERM, _stop_restart)
    try:
        start_stopped_workers(report)
        for name in names:
            report(f"{name}: stopping")
            rpc.stopProcess(name)  # SIGTERM; waits until it has exited
            rpc.startProcess(name)  # waits until it has run for startsecs
            pid = int(rpc.getProcessInfo(name)["pid"])
            _health_of(config, pid, READY_TIMEOUT)
            report(f"{name}: restarted, pid {pid}, healthy")
    finally:
        signal.signal(signal.SIGTERM, previous)
        start_stopped_workers(report)


def _stop_restart(signum: int, frame: Any) -> None:
    raise SystemExit(f"rolling restart stopped by signal {signum}")


# supervisord's states of a worker that is not running and will not start by itself.
_NOT_STARTING = frozenset({"STOPPED", "EXITED", "FATAL"})


def start_stopped_workers(report: Any = say, timeout: float = 30.0) -> None:
    """Start every worker that is stopped (waiting, bounded, for one still stopping)."""
    rpc = _rpc()
    deadline = time.monotonic() + timeout
    while True:
        states = {f"{GROUP}:{p['name']}": p["statename"] for p in workers()}
        for name, state in states.items():
            if state in _NOT_STARTING:
                try:
                    rpc.startProcess(name)
                    report(f"{name}: was {state.lower()}, started")
                except xmlrpc.client.Fault as fault:  # started meanwhile by someone else
                    report(f"{name}: not started ({fault.faultString})")
        if "STOPPING" not in states.values() or time.monotonic() > deadline:
            return
        time.sleep(0.2)
