"""Sync and asyncio clients sharing one set of op methods."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import struct
import threading
from typing import Any, Dict, List, Optional

import msgpack

__all__ = [
    "AUDIT_TIMEOUT_S",
    "BY_OP",
    "CONNECT_TIMEOUT_S",
    "LONG_TIMEOUT_S",
    "TIMEOUT_S",
    "timeout_for",
    "Client",
    "AsyncClient",
    "ClusterClient",
    "Pipeline",
    "TallyError",
    "TallyConnectionError",
    "TallyNotSentError",
]

_HEADER = struct.Struct(">I")
#: Largest reply the client accepts (the server's default frame limit, with room).
FRAME_BYTES_MAX = 16 * 1024 * 1024

#: How long connecting (and a TLS handshake) may take by default, in seconds.
CONNECT_TIMEOUT_S = 10.0

#: How long a call waits for its answer by default, in seconds: beyond
#: every wait the server itself may impose before it answers (a list page's
#: turn, 10 s; a confirmation code's mail, ~33 s), so that the server's
#: answer, even a refusal, comes first; and a stopped server is noticed.
TIMEOUT_S = 60.0

#: How long the ops that read or change the whole ledger wait by default
#: (``audit``, ``backup``, ``bulk_add``, ``reap``): their time grows with
#: the ledger (an audit reads every record: 35-40 s at 44M records), and an
#: audit may first wait up to 120 s for its turn behind another.
LONG_TIMEOUT_S = 3600.0

#: How long :meth:`audit` waits at least, whatever the client's timeout.
AUDIT_TIMEOUT_S = LONG_TIMEOUT_S


def timeout_for(op: str) -> float:
    """How long a call of ``op`` waits for its answer by default, in seconds
    (the Rust client's ``timeout_for``)."""
    if op in ("audit", "backup", "bulk_add", "reap"):
        return LONG_TIMEOUT_S
    if op in ("add_node", "remove_node"):
        # The server answers ``unknown_outcome`` once its own 60 s pass.
        return 60.0 + TIMEOUT_S
    return TIMEOUT_S


#: A client's ``timeout`` when none is given: connecting within
#: :data:`CONNECT_TIMEOUT_S`, each call within :func:`timeout_for` its op.
BY_OP: Any = object()

# A call's timeout when none is given: the client's own.
_OWN = object()
# audit()'s timeout when none is given: AUDIT_TIMEOUT_S, or the client's own if longer.
_LONG = object()


def _checked_timeout(timeout: Optional[float]) -> Optional[float]:
    # 0 would make a socket non-blocking and an asyncio wait end at once.
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return timeout


class TallyError(Exception):
    """The server answered with an error; nothing was changed.

    ``code`` is the protocol's error code (``insufficient_funds``, ...);
    ``item`` is the failing item of an atomic ``transfer_batch``.
    """

    def __init__(
        self, code: str, message: str, item: Optional[int] = None, leader: Optional[str] = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.item = item
        #: With ``not_leader``: the leader's client address (``host:port``), when known.
        self.leader = leader


class TallyConnectionError(ConnectionError):
    """The connection failed or closed; the outcome of calls in flight is unknown."""


class TallyNotSentError(TallyConnectionError):
    """The request never left whole (the connection had failed or was
    closed), so nothing was applied: the server never runs a frame it has
    not read whole."""


def _tls_context(
    ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None
) -> ssl.SSLContext:
    """A client TLS context: trusts ``ca`` (a PEM file) or the system's roots,
    checks the server's host name, and presents ``cert``/``key`` if given
    (for a server with ``[tls] client_ca``)."""
    ctx = ssl.create_default_context(cafile=ca)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _check_tls_args(tls: bool, ca: Optional[str], cert: Optional[str], key: Optional[str]) -> None:
    # A CA or certificate given without tls=True is a mistake that would
    # send passwords and keys in clear.
    if not tls and (ca is not None or cert is not None or key is not None):
        raise ValueError("ca, cert and key need tls=True")


def _frame(request_id: int, op: str, args: Dict[str, Any]) -> bytes:
    body = msgpack.packb(
        {"id": request_id, "op": op, "args": {k: v for k, v in args.items() if v is not None}},
        use_bin_type=True,
    )
    return _HEADER.pack(len(body)) + body


def _result(reply: Dict[str, Any]) -> Any:
    err = reply.get("err")
    if err is not None:
        return TallyError(err.get("code", "internal"), err.get("message", ""), err.get("item"), err.get("leader"))
    return reply.get("ok")


class _Ops:
    """One method per op of the protocol; each calls ``self.call``.

    On :class:`Client` they return the result; on :class:`AsyncClient` they
    return an awaitable of it.
    """

    def call(self, op: str, **args: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def call_within(self, timeout: Optional[float], op: str, **args: Any) -> Any:  # pragma: no cover - overridden
        """As ``call``, with ``timeout`` seconds (``None``: no limit) instead
        of the client's own timeout."""
        raise NotImplementedError

    def _own_timeout(self) -> Optional[float]:  # pragma: no cover - overridden
        raise NotImplementedError

    # Anyone
    def hello(self) -> Any:
        return self.call("hello")

    def ping(self) -> Any:
        return self.call("ping")

    def health(self) -> Any:
        """``{"status": "ok"}`` when the server can commit; else raises ``unavailable``."""
        return self.call("health")

    def help(self) -> Any:
        return self.call("help")

    def signup(self, user: str, name: str, email: str, password: str, group: Optional[str] = None) -> Any:
        return self.call("signup", user=user, name=name, email=email, password=password, group=group)

    def login(self, user: str, password: str) -> Any:
        return self.call("login", user=user, password=password)

    def auth(self, token: Optional[str] = None, key: Optional[str] = None) -> Any:
        """Binds the connection with a login token or a service key's secret."""
        return self.call("auth", token=token, key=key)

    def reset_password(self, user: str) -> Any:
        return self.call("reset_password", user=user)

    # Users
    def whoami(self) -> Any:
        return self.call("whoami")

    def logout(self, all: Optional[bool] = None) -> Any:  # noqa: A002 - the protocol's name
        """Ends this token; ``all=True``: every token of the user."""
        return self.call("logout", all=all)

    def change_password(self, old_password: str, new_password: str) -> Any:
        return self.call("change_password", old_password=old_password, new_password=new_password)

    def balance(self, account: Optional[str] = None) -> Any:
        return self.call("balance", account=account)

    def account(self, account: str) -> Any:
        return self.call("account", account=account)

    def transfer(
        self,
        to: str,
        amount: int,
        from_: Optional[str] = None,
        memo: Optional[str] = None,
        key: Optional[str] = None,
    ) -> Any:
        return self.call("transfer", to=to, amount=amount, memo=memo, key=key, **{"from": from_})

    def transfer_batch(self, transfers: List[Dict[str, Any]], atomic: bool = False) -> Any:
        """Up to ``limits.batch_max`` transfers (dicts with ``to``, ``amount``
        and optionally ``from``, ``memo``, ``key``) in one request.

        Returns ``{"results", "applied", "failed"}``: per item in order,
        ``{"id", "from_balance", "to_balance"}`` or ``{"code", "message"}``.
        With ``atomic=True`` all commit or none does; a failure raises
        :class:`TallyError` with ``item`` set to the first failing item."""
        return self.call("transfer_batch", transfers=transfers, atomic=atomic)

    def confirm(self, pending: str, otp: str, new_password: Optional[str] = None) -> Any:
        return self.call("confirm", pending=pending, otp=otp, new_password=new_password)

    def resend(self, pending: str) -> Any:
        return self.call("resend", pending=pending)

    def history(self, account: Optional[str] = None, after: Optional[int] = None, limit: Optional[int] = None) -> Any:
        return self.call("history", account=account, after=after, limit=limit)

    def get_transfer(self, id: int) -> Any:  # noqa: A002 - the protocol's name
        return self.call("get_transfer", id=id)

    def redeem(self, item: str, amount: int, memo: Optional[str] = None) -> Any:
        return self.call("redeem", item=item, amount=amount, memo=memo)

    def my_redeems(self) -> Any:
        return self.call("my_redeems")

    def hold(
        self,
        to: str,
        amount: int,
        from_: Optional[str] = None,
        memo: Optional[str] = None,
        key: Optional[str] = None,
        timeout_s: Optional[int] = None,
    ) -> Any:
        return self.call(
            "hold", to=to, amount=amount, memo=memo, key=key, timeout_s=timeout_s, **{"from": from_}
        )

    def post(self, hold: int, amount: Optional[int] = None) -> Any:
        return self.call("post", hold=hold, amount=amount)

    def void(self, hold: int) -> Any:
        return self.call("void", hold=hold)

    # Admins
    def mint(self, to: str, amount: int, memo: Optional[str] = None, key: Optional[str] = None) -> Any:
        return self.call("mint", to=to, amount=amount, memo=memo, key=key)

    def create_account(
        self,
        account: str,
        initial: int = 0,
        owner: Optional[str] = None,
        tags: Optional[List[str]] = None,
        memo: Optional[str] = None,
    ) -> Any:
        return self.call("create_account", account=account, initial=initial, owner=owner, tags=tags, memo=memo)

    def add(self, account: str, delta: int, memo: Optional[str] = None, key: Optional[str] = None) -> Any:
        return self.call("add", account=account, delta=delta, memo=memo, key=key)

    def delete_account(self, account: str, reason: str) -> Any:
        return self.call("delete_account", account=account, reason=reason)

    def delete_reason(self, account: str) -> Any:
        return self.call("delete_reason", account=account)

    def list_accounts(self, **filters: Any) -> Any:
        return self.call("list_accounts", **filters)

    def tag(self, account: str, add: Optional[List[str]] = None, remove: Optional[List[str]] = None) -> Any:
        return self.call("tag", account=account, add=add, remove=remove)

    def bulk_add(self, tag: str, delta: int, memo: Optional[str] = None, force: Optional[bool] = None) -> Any:
        return self.call("bulk_add", tag=tag, delta=delta, memo=memo, force=force)

    def reap(self, reason: str, below: Optional[int] = None) -> Any:
        return self.call("reap", reason=reason, below=below)

    def set_events(self, user: str, events: int) -> Any:
        return self.call("set_events", user=user, events=events)

    def redeems(self, status: Optional[str] = None) -> Any:
        return self.call("redeems", status=status)

    def decide_redeem(self, request: Any, accept: bool, note: Optional[str] = None) -> Any:
        return self.call("decide_redeem", request=request, accept=accept, note=note)

    def audit(self, timeout: Any = _LONG) -> Any:
        """Verifies the whole journal (sum, chain). ``timeout``: seconds
        (``None``: no limit); by default :data:`AUDIT_TIMEOUT_S`, or the
        client's own timeout if that is longer or has no limit: an audit of
        a large journal takes longer than most calls."""
        if timeout is _LONG:
            own = self._own_timeout()
            timeout = None if own is None else max(own, AUDIT_TIMEOUT_S)
        return self.call_within(timeout, "audit")

    def stats(self) -> Any:
        return self.call("stats")

    def create_key(
        self,
        name: str,
        role: str,
        accounts: Optional[List[str]] = None,
        expires_s: Optional[int] = None,
    ) -> Any:
        """``{key_id, secret, ...}``: the secret is shown this once."""
        return self.call("create_key", name=name, role=role, accounts=accounts, expires_s=expires_s)

    def list_keys(self, after: Optional[str] = None, limit: Optional[int] = None) -> Any:
        return self.call("list_keys", after=after, limit=limit)

    def revoke_key(self, key_id: str) -> Any:
        return self.call("revoke_key", key_id=key_id)

    def create_user(
        self, user: str, role: str, name: str, email: str, password: str, group: Optional[str] = None
    ) -> Any:
        return self.call(
            "create_user", user=user, role=role, name=name, email=email, password=password, group=group
        )


class Client(_Ops):
    """A blocking client over one TCP connection, or TLS with ``tls=True``.

    With TLS the server's certificate must chain to ``ca`` (a PEM file; by
    default the system's roots) and name ``host``; ``cert`` and ``key``
    present a client certificate, for a server that asks for one.

    Thread-safe: a lock serializes calls, so threads may share one client
    (they take turns; use one client per thread, or :meth:`pipeline`, for
    throughput).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7707,
        timeout: Any = BY_OP,
        *,
        tls: bool = False,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        _check_tls_args(tls, ca, cert, key)
        self._by_op = timeout is BY_OP
        self._timeout = TIMEOUT_S if self._by_op else _checked_timeout(timeout)
        connect_timeout = CONNECT_TIMEOUT_S if self._by_op else self._timeout
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise TallyConnectionError(f"cannot connect to {host}:{port}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            try:
                sock = _tls_context(ca, cert, key).wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError):
                sock.close()
                raise
        sock.settimeout(self._timeout)
        self._sock = sock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._buf = bytearray()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            # Part of a frame may be out: nothing sent after it could be read.
            self.close()
            raise TallyNotSentError(str(e)) from e

    def _read_reply(self) -> Dict[str, Any]:
        while True:
            if len(self._buf) >= 4:
                (n,) = _HEADER.unpack_from(self._buf)
                if n > FRAME_BYTES_MAX:
                    raise TallyConnectionError(f"reply of {n} bytes is too large")
                if len(self._buf) >= 4 + n:
                    body = bytes(self._buf[4 : 4 + n])
                    del self._buf[: 4 + n]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise TallyConnectionError(str(e)) from e
            if not chunk:
                raise TallyConnectionError("the server closed the connection")
            self._buf += chunk

    def _exchange(self, requests: List[bytes], ids: List[int], timeout: Any = _OWN) -> Dict[int, Any]:
        with self._lock:
            if timeout is _OWN:
                return self._exchange_locked(requests, ids)
            try:
                self._sock.settimeout(timeout)
            except OSError as e:  # the socket was closed
                raise TallyNotSentError(str(e)) from e
            try:
                return self._exchange_locked(requests, ids)
            finally:
                try:
                    self._sock.settimeout(self._timeout)
                except OSError:
                    pass  # closed meanwhile: the next call says so

    def _exchange_locked(self, requests: List[bytes], ids: List[int]) -> Dict[int, Any]:
        self._send(b"".join(requests))
        want = set(ids)
        got: Dict[int, Any] = {}
        while want:
            reply = self._read_reply()
            rid = reply.get("id")
            if rid is None:
                # The server could not read a request: fail them all.
                err = _result(reply)
                for i in want:
                    got[i] = err
                break
            # An answer to an earlier call that timed out is skipped.
            if rid in want:
                want.discard(rid)
                got[rid] = _result(reply)
        return got

    def call(self, op: str, **args: Any) -> Any:
        """Sends one request and returns its ``ok`` value (raises :class:`TallyError`)."""
        return self._call(self._timeout_of(op), op, args)

    def _timeout_of(self, op: str) -> Any:
        if self._by_op and timeout_for(op) != self._timeout:
            return timeout_for(op)
        return _OWN

    def call_within(self, timeout: Optional[float], op: str, **args: Any) -> Any:
        """As :meth:`call`, with ``timeout`` seconds (``None``: no limit)
        instead of the client's own timeout, for each read of the socket:
        then the outcome is unknown (:class:`TallyConnectionError`), and
        the late answer is skipped."""
        return self._call(_checked_timeout(timeout), op, args)

    def _own_timeout(self) -> Optional[float]:
        return self._timeout

    def _call(self, timeout: Any, op: str, args: Dict[str, Any]) -> Any:
        rid = next(self._ids)
        result = self._exchange([_frame(rid, op, args)], [rid], timeout)[rid]
        if isinstance(result, TallyError):
            raise result
        return result

    def pipeline(self) -> "Pipeline":
        """Collects calls and sends them in one write; see :class:`Pipeline`."""
        return Pipeline(self)


class Pipeline(_Ops):
    """Sends many requests at once and collects the replies by id.

    >>> with c.pipeline() as p:                      # doctest: +SKIP
    ...     for i in range(100):
    ...         p.transfer("bob", 1, from_="alice")
    >>> p.results                                     # doctest: +SKIP

    Each call returns its index in :attr:`results`. After the ``with`` block,
    ``results`` holds each reply's ``ok`` value, or a :class:`TallyError`
    instance for a refused request (errors are not raised, so one refusal does
    not hide the others).
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._requests: List[bytes] = []
        self._ids: List[int] = []
        self.results: List[Any] = []

    def call(self, op: str, **args: Any) -> int:
        rid = next(self._client._ids)
        self._requests.append(_frame(rid, op, args))
        self._ids.append(rid)
        return len(self._ids) - 1

    def call_within(self, timeout: Optional[float], op: str, **args: Any) -> int:
        """As :meth:`call`: a pipeline's replies are read with the client's timeout."""
        return self.call(op, **args)

    def _own_timeout(self) -> Optional[float]:
        return self._client._timeout

    def execute(self) -> List[Any]:
        got = self._client._exchange(self._requests, self._ids) if self._ids else {}
        self.results = [got[i] for i in self._ids]
        self._requests, self._ids = [], []
        return self.results

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.execute()


class AsyncClient(_Ops):
    """An asyncio client; many calls may be in flight at once (pipelining).

    Use from one event loop. ``await AsyncClient.connect(...)`` or
    ``async with AsyncClient(...)``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7707,
        timeout: Any = BY_OP,
        *,
        tls: bool = False,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        _check_tls_args(tls, ca, cert, key)
        self._by_op = timeout is BY_OP
        self._host, self._port = host, port
        self._timeout: Optional[float] = TIMEOUT_S if self._by_op else timeout
        self._ssl: Optional[ssl.SSLContext] = _tls_context(ca, cert, key) if tls else None
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._pending: Dict[int, "asyncio.Future[Any]"] = {}
        self._ids = itertools.count(1)
        self._task: Optional["asyncio.Task[None]"] = None
        self._lost: Optional[Exception] = None

    @classmethod
    async def connect(
        cls, host: str = "127.0.0.1", port: int = 7707, timeout: Any = BY_OP, **tls: Any
    ) -> "AsyncClient":
        """Connects; ``tls``, ``ca``, ``cert``, ``key`` as for :class:`Client`."""
        c = cls(host, port, timeout, **tls)
        await c._open()
        return c

    async def _open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=self._ssl),
                CONNECT_TIMEOUT_S if self._by_op else self._timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise TallyConnectionError(f"cannot connect to {self._host}:{self._port}: {e}") from e
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    async def __aenter__(self) -> "AsyncClient":
        if self._writer is None:
            await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        closed = TallyConnectionError("the client was closed")
        self._lost = self._lost or closed
        self._fail_all(closed)

    def _fail_all(self, error: Exception) -> None:
        for f in self._pending.values():
            if not f.done():
                f.set_exception(error)
        self._pending.clear()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(4)
                (n,) = _HEADER.unpack(header)
                if n > FRAME_BYTES_MAX:
                    raise TallyConnectionError(f"reply of {n} bytes is too large")
                reply = msgpack.unpackb(await self._reader.readexactly(n), raw=False, strict_map_key=False)
                fut = self._pending.pop(reply.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(_result(reply))
        except (asyncio.IncompleteReadError, OSError, TallyConnectionError) as e:
            self._lost = TallyConnectionError(f"connection lost: {e}")
            self._fail_all(self._lost)
        except asyncio.CancelledError:
            pass

    async def call(self, op: str, **args: Any) -> Any:  # type: ignore[override]
        """Sends one request and awaits its ``ok`` value (raises :class:`TallyError`)."""
        return await self._call(timeout_for(op) if self._by_op else (self._timeout or None), op, args)

    async def call_within(self, timeout: Optional[float], op: str, **args: Any) -> Any:  # type: ignore[override]
        """As :meth:`call`, waiting at most ``timeout`` seconds (``None``: no
        limit) for the answer instead of the client's own timeout; then
        raises :class:`asyncio.TimeoutError` (the outcome is unknown)."""
        return await self._call(_checked_timeout(timeout), op, args)

    def _own_timeout(self) -> Optional[float]:
        return self._timeout or None

    async def _call(self, timeout: Optional[float], op: str, args: Dict[str, Any]) -> Any:
        if self._writer is None:
            raise TallyNotSentError("not connected")
        if self._lost is not None:
            raise TallyNotSentError(str(self._lost)) from self._lost
        rid = next(self._ids)
        fut: "asyncio.Future[Any]" = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(_frame(rid, op, args))
            await self._writer.drain()
        except OSError as e:
            self._pending.pop(rid, None)
            raise TallyConnectionError(str(e)) from e
        try:
            result = await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        finally:
            # Timed out: its answer, if it comes, finds no one waiting.
            self._pending.pop(rid, None)
        if isinstance(result, TallyError):
            raise result
        return result


#: Ops that change nothing: sent again after a lost answer.
_READS = frozenset(
    "hello ping help health whoami balance account history get_transfer list_accounts "
    "delete_reason redeems my_redeems audit stats list_keys".split()
)


#: How long a member may take to answer ``hello`` when the client looks
#: for the leader: a member that does not answer is skipped.
_PROBE_TIMEOUT_S = 1.0

#: Refusals that come before a request's idempotency key is looked at: to
#: a resend, they say nothing of what the first send did.
_UNSETTLED = frozenset(["unavailable", "overloaded", "rate_limited", "internal", "unauthenticated"])


def _lost_answer(op: str, why: str) -> TallyError:
    """``unknown_outcome`` for a write whose answer was lost, and whose
    resends got no definite answer either: it may or may not have been
    applied. Never ``unavailable``, which says that nothing changed."""
    return TallyError(
        "unknown_outcome",
        f"the answer to {op} was lost and resending it found {why}; it may or may not have been applied",
    )


def _split(addr: str):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class ClusterClient(_Ops):
    """A blocking client of a cluster: it talks to the member that leads.

    ``members`` are the members' client addresses (``"host:port"``). A
    ``not_leader`` answer changed nothing, so the call goes again to the
    leader it names. A call whose answer was lost (the connection closed,
    or ``unknown_outcome``) is sent again only if it carries an idempotency
    ``key`` (or is a read): the second send then answers with the first
    one's record. Without a key the caller gets ``unknown_outcome`` and
    decides; such a write is never retried silently. A keyed write whose
    resends get no definite answer within ``patience`` (counted again from
    the first lost answer) is ``unknown_outcome`` too, never
    ``unavailable``, which says nothing changed. ``token`` (from a
    ``login`` at any member) is presented on every new connection. Only
    the given addresses are dialled: a ``not_leader`` naming another is
    followed by asking the given members.
    """

    def __init__(self, members: List[str], token: Optional[str] = None, patience: float = 10.0) -> None:
        self.members = list(members)
        self.token = token
        self.patience = patience
        self._client: Optional[Client] = None

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _leader(self, hint: Optional[str], deadline: float) -> Client:
        import time

        if hint is None and self._client is not None:
            return self._client
        self.close()
        while True:
            for addr in ([hint] if hint else []) + self.members:
                try:
                    c = Client(*_split(addr))
                except TallyConnectionError:
                    continue
                try:
                    if c.call_within(_PROBE_TIMEOUT_S, "hello").get("role") == "leader":
                        if self.token is not None:
                            c.auth(token=self.token)
                        self._client = c
                        return c
                except (TallyError, TallyConnectionError):
                    pass
                c.close()
            if time.monotonic() >= deadline:
                raise TallyError("unavailable", "no member of the cluster says it leads")
            time.sleep(0.05)

    def call(self, op: str, **args: Any) -> Any:
        """Sends ``op`` to the leader, following it as described above; each
        send waits :func:`timeout_for` its op."""
        return self._call(timeout_for(op), op, args)

    def call_within(self, timeout: Optional[float], op: str, **args: Any) -> Any:
        """As :meth:`call`, each send with ``timeout`` seconds (``None``: no
        limit) instead of :func:`timeout_for` its op. A send that timed out
        counts as a lost answer: a read or a keyed write goes again while
        ``patience`` lasts."""
        return self._call(_checked_timeout(timeout), op, args)

    def _own_timeout(self) -> Optional[float]:
        return TIMEOUT_S

    def _call(self, timeout: Any, op: str, args: Dict[str, Any]) -> Any:
        import time

        read = op in _READS
        resend = args.get("key") is not None or read
        deadline = time.monotonic() + self.patience
        hint: Optional[str] = None
        # Once an answer was lost, a refusal of the resend that comes before
        # its key is looked at (``unavailable``, ``overloaded``...) says only
        # that the resend changed nothing (the first send may have been
        # applied): only the key's own answer is definite, and a write that
        # never gets one is ``unknown_outcome``.
        lost_before = False
        while True:
            try:
                c = self._leader(hint, deadline)
            except TallyError:
                if lost_before and not read:
                    raise _lost_answer(op, "no leader in time") from None
                raise
            hint = None
            try:
                return c._call(timeout, op, args)
            except TallyNotSentError:
                # Never sent (e.g. on a connection the member closed when it
                # stopped leading): as if not yet tried, on a new connection.
                self.close()
                if time.monotonic() >= deadline:
                    if lost_before and not read:
                        raise _lost_answer(op, "no leader in time") from None
                    raise TallyError("unavailable", f"{op} found no leader that answered in time") from None
                continue
            except TallyError as e:
                if e.code == "not_leader":
                    self.close()
                    # Only a member it was given: the address the cluster
                    # configured may not be reachable, or safe, from here.
                    hint = e.leader if e.leader in self.members else None
                    if hint is None:
                        if time.monotonic() >= deadline:
                            if lost_before and not read:
                                raise _lost_answer(op, "no leader in time") from None
                            raise
                        time.sleep(0.05)  # a leader not serving yet: poll, not spin
                    continue
                if e.code != "unknown_outcome" and not (lost_before and resend and e.code in _UNSETTLED):
                    raise
            except TallyConnectionError:
                self.close()
            # The answer was lost.
            if not lost_before:
                # The first loss may come after the patience (a timeout is
                # longer): the resend still gets a full turn.
                deadline = max(deadline, time.monotonic() + self.patience)
            lost_before = True
            if not resend:
                raise TallyError("unknown_outcome", f"the answer to {op} was lost; it may or may not have been applied")
            if time.monotonic() >= deadline:
                if not read:
                    raise _lost_answer(op, "no leader that answered in time")
                raise TallyError("unavailable", f"{op} found no leader that answered in time")
            time.sleep(0.05)  # the cluster is changing leaders: give it a moment
