"""Stand-ins for the services the gateway talks to, each run as a real process on a loopback
port (exchange.py: Binance's public spot API); control.py has the handles tests drive them with.
"""
