"""Hypercorn settings derived from the gateway's configuration (config.py, environment variables).

    hypercorn --config file:hypercorn_config.py wsgi:app
"""
import os
import sys

# Hypercorn loads this file before the app, with the project not yet on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atexit  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from config import Config  # noqa: E402

# Every worker writes its metrics to files in this directory (prometheus_client's multiprocess
# mode) and a scrape of any worker reads them all: one scrape gives the whole host. The workers
# inherit it from this process's environment. A deployment that runs each worker as a Hypercorn
# of its own (deploy/) sets one directory for all of them and empties it when it starts.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics_dir = tempfile.mkdtemp(prefix="sigmax-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    atexit.register(shutil.rmtree, _metrics_dir, True)

# Every WebSocket is a file descriptor: a worker holding 10,000 needs more than the usual soft
# limit of 1024. The soft limit may be raised up to the hard one (systemd: LimitNOFILE) without
# privileges; the workers inherit it.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (_hard if _hard != resource.RLIM_INFINITY else 1 << 20, _hard)
    )

globals().update(Config.from_env().hypercorn_settings())
