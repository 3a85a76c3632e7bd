"""Configuration: environment variables, defaults, refusals, and the README's table."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import yaml
from hypercorn.utils import LifespanFailureError

from config import Config
from tests.helpers import REPOSITORY, running_gateway


class TestConfig:
    def test_defaults_are_the_specs(self):
        config = Config.from_env({})
        assert config.WS_MAX_CONNECTIONS == 1000
        assert config.WS_HEARTBEAT_INTERVAL == 30
        assert config.WS_CONNECTION_TIMEOUT == 60
        assert config.REDIS_URL == ""

    def test_environment_overrides_with_types(self):
        config = Config.from_env(
            {
                "WS_MAX_CONNECTIONS": "5",
                "WS_HEARTBEAT_INTERVAL": "2.5",
                "CORS_ORIGINS": "http://a, http://b",
                "REDIS_URL": "redis://127.0.0.1:6379",
            }
        )
        assert config.WS_MAX_CONNECTIONS == 5
        assert config.WS_HEARTBEAT_INTERVAL == 2.5
        assert config.CORS_ORIGINS == ("http://a", "http://b")
        assert config.REDIS_URL == "redis://127.0.0.1:6379"

    @pytest.mark.parametrize(
        "env",
        [
            {"WS_MAX_CONNECTIONS": "many"},
            {"WS_MAX_CONNECTIONS": "0"},
            {"WS_CONNECTION_TIMEOUT": "-1"},
        ],
    )
    def test_bad_values_are_refused_by_name(self, env):
        with pytest.raises(ValueError, match=next(iter(env))):
            Config.from_env(env)


def test_a_negative_gc_interval_is_refused():
    with pytest.raises(ValueError, match="GC_INTERVAL"):
        Config(GC_INTERVAL=-1)


def readme_settings() -> dict[str, str]:
    """The README's configuration table: each variable and its default as written there."""
    text = (REPOSITORY / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    settings = {}
    for row in table.splitlines()[2:]:
        names, defaults = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names_list = re.findall(r"`([A-Z_0-9]+)`", names)
        defaults_list = ["empty"] if defaults == "empty" else re.findall(r"`([^`]*)`", defaults)
        assert len(names_list) == len(defaults_list), row
        settings.update(zip(names_list, defaults_list, strict=True))
    return settings


def as_written(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) if value else "empty"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "empty"


def test_the_readme_documents_every_setting_with_its_default():
    """config.py defines the settings once; the README's table cannot drift from it."""
    defaults = {f.name: as_written(f.default) for f in fields(Config)}
    assert readme_settings() == defaults


async def test_a_gateway_reachable_from_the_network_refuses_to_start_keyless(tmp_path):
    """HOST other than loopback with no key anywhere: start-up refuses, naming the ways out;
    a key, or ALLOW_OPEN_GATEWAY, lets it start."""
    # Hypercorn reports the start-up's failure with the gateway's message.
    with pytest.raises(LifespanFailureError, match="API_KEYS.*ALLOW_OPEN_GATEWAY"):
        async with running_gateway(HOST="0.0.0.0"):
            pass
    async with running_gateway(HOST="0.0.0.0", API_KEYS=("k:read",)) as server:
        assert server.gateway.running
    async with running_gateway(HOST="0.0.0.0", ALLOW_OPEN_GATEWAY=True) as server:
        assert server.gateway.running
    async with running_gateway(HOST="127.0.0.1") as server:  # loopback: open as ever
        assert server.gateway.running


def test_compose_never_publishes_a_keyless_gateway():
    """compose.yaml publishes the gateway's port: its API_KEYS must be required (compose's
    `${VAR:?message}` refuses to start without it), never defaulted to nothing."""
    compose = yaml.safe_load((REPOSITORY / "compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway.get("ports"), "the gateway's port is published"
    assert re.fullmatch(r"\$\{API_KEYS:\?.+\}", gateway["environment"]["API_KEYS"])
    assert "ALLOW_OPEN_GATEWAY" not in gateway["environment"]
