"""GET /metrics: Prometheus text from prometheus_client, one scrape for the whole host."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from typing import Any

import yaml
from prometheus_client import REGISTRY

import app.services.metrics  # noqa: F401  (the gateway's metrics, registered on import)
from tests.helpers import (
    REPOSITORY,
    free_port,
    metric_families,
    metric_value,
    migrate_with_cli,
    start_host,
    stop_host,
)
from tests.test_redis import open_client, post_alerts

# What an operator's dashboards and alert rules use (README, Operations).
EXPECTED = {
    "sigmax_ws_connections": "gauge",
    "sigmax_ws_deliveries": "counter",
    "sigmax_ws_connections_opened": "counter",
    "sigmax_ws_slow_consumer_closes": "counter",
    "sigmax_limit_refusals": "counter",
    "sigmax_events_published": "counter",
    "sigmax_delivery_latency_seconds": "histogram",
    "sigmax_fanout_seconds_per_event": "histogram",
    "sigmax_http_request_duration_seconds": "histogram",
    "sigmax_command_duration_seconds": "histogram",
    "sigmax_gc_pause_seconds": "histogram",
    "sigmax_event_loop_lag_seconds": "histogram",
    "sigmax_redis_stream_lag_events": "gauge",
    "sigmax_leader": "gauge",
    "sigmax_worker_receiving": "gauge",
    "sigmax_engine_reachable": "gauge",
    "sigmax_archive_written": "counter",
    "sigmax_archive_behind_events": "gauge",
}


def scrape(port: int) -> tuple[str, dict[str, Any]]:
    """The worker that answered, and {name: (type, help, {(sample, labels): value})}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        worker = response.headers["X-Sigmax-Worker"]
        text = response.read().decode()
    return worker, metric_families(text)


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


async def test_one_scrape_of_any_worker_gives_the_whole_host(redis_prefix, tmp_path):
    """Two Hypercorn workers: every scrape (whichever worker answers) counts every worker's
    connections and deliveries, and each published event once."""
    url, prefix = redis_prefix
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": f"sqlite:///{tmp_path}/metrics.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
        "METRICS_INTERVAL": "0.2",
        # Its own directory: prometheus_client reads every *.db file there as metrics.
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    migrate_with_cli(env)
    port = free_port()
    log_path = tmp_path / "host.log"
    log = log_path.open("wb")  # noqa: SIM115 - the host writes it until it is stopped
    host = start_host(port, 2, env, log)
    clients = []
    try:
        workers: dict[str, int] = {}
        for _ in range(200):  # bounded: until both workers hold clients
            client, worker = await open_client(port)
            clients.append(client)
            workers[worker] = workers.get(worker, 0) + 1
            if len(workers) == 2 and len(clients) >= 6:
                break
            await asyncio.sleep(0.05)
        assert len(workers) == 2, "both workers should take connections"
        assert (await clients[0].command("get_status"))["type"] == "system_status"
        await asyncio.to_thread(post_alerts, port, 0, 40)
        for client in clients:
            for _ in range(40):
                assert (await client.recv_event())["type"] == "alert"
        await asyncio.sleep(0.5)  # past METRICS_INTERVAL: each worker has copied its counters

        answered_by = set()
        for scrapes in range(200):  # at least 20, and until both workers have answered
            if scrapes >= 20 and len(answered_by) == 2:
                break
            worker, families = await asyncio.to_thread(scrape, port)
            answered_by.add(worker)
            assert metric_value(families, "sigmax_ws_connections") == len(clients)
            deliveries = metric_value(
                families, "sigmax_ws_deliveries", "sigmax_ws_deliveries_total"
            )
            assert deliveries == 40 * len(clients)
            published = metric_value(
                families, "sigmax_events_published", "sigmax_events_published_total", type="alert"
            )
            assert published == 40  # once, not once per worker
            receiving = families["sigmax_worker_receiving"][2]
            assert len(receiving) == 2 and set(receiving.values()) == {1.0}
            assert metric_value(families, "sigmax_worker_up") == 2
            assert metric_value(families, "sigmax_workers_configured") == 2
            for name, kind in EXPECTED.items():
                assert families[name][0] == kind, name
            for name, (_, documentation, _) in families.items():
                if name.startswith("sigmax_"):
                    assert documentation, f"{name} has no HELP"
        ingest = metric_value(
            families,
            "sigmax_http_request_duration_seconds",
            "sigmax_http_request_duration_seconds_count",
            route="/api/events",
            status="202",
        )
        assert ingest == 1
        assert answered_by == set(workers)

        # The archive wrote each event once for the deployment (one archivist of two workers).
        archived = 0.0
        for _ in range(100):  # bounded: 10 s for a flush and a metrics copy
            _, families = await asyncio.to_thread(scrape, port)
            archived = metric_value(
                families, "sigmax_archive_written", "sigmax_archive_written_total"
            )
            if archived >= 40:
                break
            await asyncio.sleep(0.1)
        assert archived == 40

        # /api/health and every log line name the worker.
        healthy_from = set()
        for _ in range(200):  # bounded: until both workers have answered
            health = await asyncio.to_thread(get_json, port, "/api/health")
            healthy_from.add(health["worker"])
            if healthy_from == set(workers):
                break
        assert healthy_from == set(workers)
    finally:
        for client in clients:
            await client.ws.close()
        stop_host(host)
        log.close()
    lines = [line for line in log_path.read_text().splitlines() if " app." in line]
    pids = {worker.rsplit(":", 1)[1] for worker in workers}
    assert lines and all(re.search(r" \[(\d+)\] ", line)[1] in pids for line in lines), lines


def metrics_asked(queries: list[str]) -> set[str]:
    """The gateway's metric families that PromQL `queries` name."""
    return {
        re.sub(r"_(total|bucket|count|sum)$", "", name)
        for query in queries
        for name in re.findall(r"\bsigmax_\w+", query)
    }


def test_the_shipped_alert_rules_ask_only_for_metrics_the_gateway_exports():
    """deploy/prometheus/alerts.yml cannot drift from app/services/metrics.py."""
    exported = {family.name for family in REGISTRY.collect()}
    rules = yaml.safe_load((REPOSITORY / "deploy" / "prometheus" / "alerts.yml").read_text())
    asked = metrics_asked([rule["expr"] for group in rules["groups"] for rule in group["rules"]])
    assert asked and asked <= exported, asked - exported


def test_the_grafana_dashboard_asks_only_for_metrics_the_gateway_exports():
    """deploy/grafana/sigmax-gateway.json: every panel has a title and queries, and every
    query names exported metrics only."""
    exported = {family.name for family in REGISTRY.collect()}
    dashboard = json.loads((REPOSITORY / "deploy" / "grafana" / "sigmax-gateway.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"], panel
        queries += [target["expr"] for target in panel["targets"]]
    asked = metrics_asked(queries)
    assert len(asked) >= 15 and asked <= exported, asked - exported


def test_dead_workers_counters_are_folded_into_one_file_and_kept(tmp_path):
    """Six workers that started, counted and died leave one file per kind, not six each, and
    every total they counted: restarts do not pile files up for every scrape to read."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from app.services import metrics\n"
        "metrics.WORKER_STARTS.inc()\n"
        "metrics.LOOP_LAG.observe(0.01)\n"
    )
    for _ in range(6):
        subprocess.run(
            [sys.executable, "-c", worker], cwd=REPOSITORY, env=env, check=True, timeout=60
        )
    scrape = "from app.services import metrics\nprint(metrics.exposition(None)[0].decode())\n"
    for _ in range(2):  # the second scrape reads the folded totals: the same, not more
        text = subprocess.run(
            [sys.executable, "-c", scrape],
            cwd=REPOSITORY,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        families = metric_families(text)
        assert metric_value(families, "sigmax_worker_starts", "sigmax_worker_starts_total") == 6
        lag = metric_value(
            families, "sigmax_event_loop_lag_seconds", "sigmax_event_loop_lag_seconds_count"
        )
        assert lag == 6
    pids = {path.stem.rsplit("_", 1)[1] for path in tmp_path.glob("*.db")}
    assert len(pids) <= 2 and "0" in pids, pids  # the folded totals, and the last scraper's
