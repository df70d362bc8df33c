"""Thin Python client for the Tally ledger server.

Speaks the wire protocol directly: a 4-byte big-endian length, then a
MessagePack map ``{"id", "op", "args"}``. Every method returns the reply's
``ok`` value as plain Python data, or raises :class:`TallyError` with the
protocol's error ``code``.

>>> from tally import Client
>>> with Client("127.0.0.1", 7707) as c:          # doctest: +SKIP
...     c.login("admin", "change-me")
...     c.create_account("alice", initial=100)
...     c.transfer("bob", 30, from_="alice")["to_balance"]
"""

from ._client import (
    AUDIT_TIMEOUT_S,
    BY_OP,
    CONNECT_TIMEOUT_S,
    LONG_TIMEOUT_S,
    TIMEOUT_S,
    AsyncClient,
    Client,
    ClusterClient,
    Pipeline,
    TallyConnectionError,
    TallyError,
    TallyNotSentError,
    timeout_for,
)
from ._client import __all__  # the same public names
