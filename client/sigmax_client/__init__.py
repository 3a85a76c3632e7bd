"""Python client of the SIGMAX WebSocket API.

```python
from sigmax_client import SigmaxWebSocketClient, connect_sigmax

client = await connect_sigmax(topics=["proposals", "executions"], symbols=["BTC/USDT"])
async for event in client.listen():
    print(event.seq, event.type, event.data)
```
"""

from sigmax_client.client import (
    DEFAULT_URL,
    EventCallback,
    SigmaxWebSocketClient,
    backoff_delay,
    connect_sigmax,
)
from sigmax_client.errors import (
    AuthenticationError,
    InvalidSubscriptionError,
    RequestError,
    RequestTimeoutError,
    SigmaxConnectionError,
    SigmaxError,
)
from sigmax_client.events import RESYNC_REQUIRED, WSEvent
from sigmax_client.publisher import SigmaxPublisher

__version__ = "2.0.0"

__all__ = [
    "DEFAULT_URL",
    "RESYNC_REQUIRED",
    "AuthenticationError",
    "EventCallback",
    "InvalidSubscriptionError",
    "RequestError",
    "RequestTimeoutError",
    "SigmaxConnectionError",
    "SigmaxError",
    "SigmaxPublisher",
    "SigmaxWebSocketClient",
    "WSEvent",
    "backoff_delay",
    "connect_sigmax",
]
