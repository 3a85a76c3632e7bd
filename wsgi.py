"""The ASGI entry point: `hypercorn --config file:hypercorn_config.py wsgi:app`."""

from app import create_app

app = create_app()
