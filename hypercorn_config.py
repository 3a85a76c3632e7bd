"""Hypercorn settings derived from the gateway's configuration (config.py, environment variables).

    hypercorn --config file:hypercorn_config.py wsgi:app
"""
import os
import sys

# Hypercorn loads this file before the app, with the project not yet on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import Config  # noqa: E402

globals().update(Config.from_env().hypercorn_settings())
