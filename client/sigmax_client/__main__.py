"""`python -m sigmax_client tail ...`: the same as the `sigmax-client` command."""

from sigmax_client.cli import main

raise SystemExit(main())
