"""TLS: the gateway served over https:// and wss:// by Hypercorn (TLS_CERTFILE, TLS_KEYFILE), as
`hypercorn --config file:hypercorn_config.py` and as supervised workers run it, with a
self-signed certificate made by `openssl` here; both clients trust it through a CA file and send
their key in a header."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from sigmax_client import SigmaxConnectionError, SigmaxPublisher, connect_sigmax

from tests.helpers import (
    REPOSITORY,
    free_port,
    migrate_with_cli,
    rolling_restart,
    start_host,
    stop_host,
    supervised,
)

pytestmark = pytest.mark.timeout(120)

KEY = "tls-key-0123456789"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "gateway.pem", folder / "gateway.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def tls_env(certificate: tuple[Path, Path], folder: Path) -> dict[str, str]:
    """A keyed gateway serving TLS with `certificate`, its database in `folder`."""
    cert, key = certificate
    return {
        "TLS_CERTFILE": str(cert),
        "TLS_KEYFILE": str(key),
        "API_KEYS": KEY,
        "DATABASE_URL": f"sqlite:///{folder}/gateway.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
    }


async def serving_tls(port: int, cafile: Path, timeout: float = 20) -> str:
    """Until the gateway on `port` completes a TLS handshake; returns the TLS version."""
    context = ssl.create_default_context(cafile=str(cafile))

    def handshake() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
                return str(wrapped.version())

    async with asyncio.timeout(timeout):
        while True:
            try:
                return await asyncio.to_thread(handshake)
            except OSError:
                await asyncio.sleep(0.1)


async def test_both_clients_over_wss_with_a_ca_file_and_the_key_in_a_header(certificate, tmp_path):
    cert, _ = certificate
    port = free_port()
    env = tls_env(certificate, tmp_path)
    migrate_with_cli(env)
    host = start_host(port, 1, env)
    try:
        version = await serving_tls(port, cert)
        client = await connect_sigmax(
            f"wss://127.0.0.1:{port}/api/ws", ["alerts"], api_key=KEY, ca_file=str(cert)
        )
        node = asyncio.create_task(_typescript_client_receives_one_alert(port, cert))
        publisher = SigmaxPublisher(f"https://127.0.0.1:{port}", api_key=KEY, ca_file=str(cert))
        await asyncio.sleep(1.5)  # the TypeScript client subscribes meanwhile
        await publisher.publish([{"type": "alert", "data": {"level": "info", "message": "tls"}}])
        async with asyncio.timeout(10):
            async for event in client.listen():
                if event.type == "alert":
                    break
        await client.disconnect()
        node_received = await node
        # Without the CA file the certificate is not trusted: no connection, no key sent.
        with pytest.raises(SigmaxConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await connect_sigmax(
                f"wss://127.0.0.1:{port}/api/ws", api_key=KEY, auto_reconnect=False
            )
    finally:
        stop_host(host)
    assert version in ("TLSv1.2", "TLSv1.3")
    assert event.data["message"] == "tls"
    assert node_received["data"]["message"] == "tls"


async def _typescript_client_receives_one_alert(port: int, cert: Path) -> dict:
    """The bundled TypeScript client (app/static/sigmax.js) under Node, trusting the
    certificate through NODE_EXTRA_CA_CERTS; the first alert it receives."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = f"""
import {{ SigmaxWebSocket }} from {json.dumps((REPOSITORY / "app/static/sigmax.js").as_uri())};
const client = new SigmaxWebSocket({{ apiKey: {json.dumps(KEY)}, autoReconnect: false }});
await client.connect('wss://127.0.0.1:{port}/api/ws');
await client.subscribe(['alerts']);
client.on('alert', async (event) => {{
  console.log(JSON.stringify(event));
  await client.disconnect();
  process.exit(0);
}});
setTimeout(() => process.exit(3), 15000);
"""
    done = await asyncio.create_subprocess_exec(
        node,
        "--experimental-websocket",
        "--input-type=module",
        "-e",
        script,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await done.communicate()
    assert done.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


def test_tls_settings_go_together_and_reach_hypercorn(certificate):
    from config import Config

    cert, key = certificate
    with pytest.raises(ValueError, match="TLS_CERTFILE and TLS_KEYFILE"):
        Config(TLS_CERTFILE=str(cert))
    settings = Config(TLS_CERTFILE=str(cert), TLS_KEYFILE=str(key)).hypercorn_settings()
    assert (settings["certfile"], settings["keyfile"]) == (str(cert), str(key))
    assert "certfile" not in Config().hypercorn_settings()


async def test_supervised_workers_serve_tls_and_restart_one_by_one(certificate, tmp_path):
    """`python -m app supervise` (make supervise, the image, systemd) serves TLS from the same
    settings, and a rolling restart checks each new worker over https."""
    cert, _ = certificate
    port = free_port()
    env = {
        **tls_env(certificate, tmp_path),
        "PORT": str(port),
        "WORKERS": "1",
        "SIGMAX_RUN_DIR": str(tmp_path / "run"),
    }
    migrate_with_cli(env)
    with supervised(env):
        await serving_tls(port, cert)
        client = await connect_sigmax(
            f"wss://127.0.0.1:{port}/api/ws", api_key=KEY, ca_file=str(cert)
        )
        status = await client.get_status()
        await client.disconnect()
        restarted = await asyncio.to_thread(rolling_restart, env)
    assert status["status"] in ("running", "paused")
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.count("healthy") == 1
