"""Redis connections: one configured client per process, with retries, Sentinel, TLS and a start-up check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlparse

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from lightning_queue.core.errors import (
    ConfigurationError,
    InvalidRedisUrlError,
    RedisAuthError,
    RedisUnavailableError,
    redacted_url,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def text(value: object) -> str:
    """A Redis reply as ``str`` (clients here return bytes: snapshot payloads are binary)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisUnreachableError(RedisUnavailableError, redis.ConnectionError):
    """Redis stopped answering mid-operation and the retries ran out (or a wait's deadline passed).

    A :class:`RedisUnavailableError` naming the URL (password masked), as users catch it; also a
    ``redis.ConnectionError``, so redis-py itself and code written against it (the worker's
    requeue on a lost connection) treat it as before.
    """


class LightningRedis(redis.Redis):
    """A redis-py client built by :func:`connect`: it remembers the URL and Sentinel master it
    was built from, so :func:`waiting_client` can open a client with other time-outs to the same
    server."""

    lq_url: str = ""
    lq_sentinel_master: str | None = None


def connect(
    url: str,
    sentinel_master: str | None = None,
    *,
    check: bool = True,
    retry_seconds: float = 10.0,
    io_timeout: float | None = None,
    max_connections: int | None = None,
) -> redis.Redis:
    """A client for ``url`` that rides out short connection drops.

    Commands are retried with exponential backoff for up to ``retry_seconds``
    (``Settings.redis_retry_seconds``) on connection errors and time-outs, so a
    Redis restart or a network blip does not fail a rollout half way; a longer
    outage raises :class:`RedisUnreachableError` (a :class:`RedisUnavailableError`
    naming the URL, password masked, that is also a ``redis.ConnectionError``).
    ``io_timeout`` bounds every connect and socket read (default: redis-py's);
    ``max_connections`` the connections its pool opens at once (default: redis-py's, 100).

    ``url`` is a ``redis://`` / ``rediss://`` URL, or Redis Sentinel in kombu's
    form, ``sentinel://[:password@]host:26379[/db];sentinel://host2:26379...``,
    with ``sentinel_master`` the name the Sentinels monitor the primary under:
    the client then asks the Sentinels for the current primary, and again after
    a failover (the password and db are the primary's; the Sentinels themselves
    are reached without one, as kombu does).

    With ``check`` (the default) the server is asked once now, so a bad
    configuration fails here with a clear error rather than on first use:
    :class:`InvalidRedisUrlError` for a URL Redis clients cannot parse,
    :class:`RedisAuthError` for refused credentials (at once, not retried),
    :class:`RedisUnavailableError` when nothing answers through the backoff.
    Every message names the URL with its password masked.
    TLS options go in the URL's query (``rediss://host:6380/0?ssl_ca_certs=/ca.pem``).
    """
    options: dict[str, Any] = {
        "retry": retry_policy(retry_seconds, url),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
        "socket_keepalive": True,
    }
    if io_timeout is not None:
        options.update(socket_timeout=io_timeout, socket_connect_timeout=io_timeout)
    if max_connections is not None:
        options["max_connections"] = max_connections
    if is_sentinel_url(url):
        hosts, master, primary = _sentinel_options(url, sentinel_master)
        sentinel_timeout = 5.0 if io_timeout is None else io_timeout
        sentinels = Sentinel(hosts, socket_timeout=sentinel_timeout,
                             socket_connect_timeout=sentinel_timeout)
        client = cast(LightningRedis, sentinels.master_for(
            master, redis_class=LightningRedis, **primary, **options))
    else:
        client = cast(LightningRedis, _from_url(LightningRedis.from_url, url, options))
    client.lq_url, client.lq_sentinel_master = url, sentinel_master
    if check:
        check_connection(url, client)
    return client


def _from_url(build: Callable[..., T], url: str, options: dict[str, Any]) -> T:
    try:
        return build(url, **options)
    except ValueError as exc:
        raise InvalidRedisUrlError(url, exc) from None


WAIT_IO_TIMEOUT = 0.5
"""Seconds a wait's connection waits for a connect or for data before it counts as broken: the
most a wait can overrun its deadline by while Redis does not answer."""


@contextmanager
def waiting_client(client: redis.Redis) -> Iterator[tuple[redis.Redis, str]]:
    """A client for one wait on ``client``'s server, and that server's URL (for error messages).

    For a client built by :func:`connect`: a new one to the same server whose connects and reads
    give up after :data:`WAIT_IO_TIMEOUT` and which never retries (the wait retries itself, up
    to its deadline), closed on exit. Any other client (e.g. fakeredis) is used as it is.
    """
    if not isinstance(client, LightningRedis):
        yield client, server_url(client)
        return
    sibling = connect(client.lq_url, client.lq_sentinel_master, check=False, retry_seconds=0,
                      io_timeout=WAIT_IO_TIMEOUT)
    try:
        yield sibling, client.lq_url
    finally:
        sibling.close()
        sibling.connection_pool.disconnect()


def connect_async(url: str, sentinel_master: str | None = None, *, io_timeout: float = WAIT_IO_TIMEOUT
                  ) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` (a ``redis://``, ``rediss://`` or Sentinel URL, as
    :func:`connect` takes), for waits: no retries (the wait retries itself, up to its
    deadline), connects and reads give up after ``io_timeout``. No I/O happens here."""
    options: dict[str, Any] = {
        "retry": redis.asyncio.retry.Retry(NoBackoff(), 0),
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_timeout": io_timeout,
        "socket_connect_timeout": io_timeout,
    }
    if is_sentinel_url(url):
        hosts, master, primary = _sentinel_options(url, sentinel_master)
        sentinels = redis.asyncio.sentinel.Sentinel(
            hosts, socket_timeout=io_timeout, socket_connect_timeout=io_timeout)
        return cast(redis.asyncio.Redis, sentinels.master_for(master, **primary, **options))
    return _from_url(redis.asyncio.Redis.from_url, url, options)


def server_url(client: redis.Redis | redis.asyncio.Redis) -> str:
    """The URL of a client's server, for messages: the one it was built from (by :func:`connect`),
    else made from its connection settings (never with a password)."""
    if isinstance(client, LightningRedis):
        return client.lq_url
    connection_kwargs = client.connection_pool.connection_kwargs
    if connection_kwargs.get("path"):
        return f"unix://{connection_kwargs['path']}"
    return (f"redis://{connection_kwargs.get('host', '?')}:{connection_kwargs.get('port', 6379)}"
            f"/{connection_kwargs.get('db', 0)}")


_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 2.0


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next try after ``failures`` failed ones in a row: 0.1, 0.2,
    0.4 ... capped at 2 s (the schedule :func:`retry_policy` gives redis-py)."""
    return float(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures))


class _NamingRetry(Retry):
    """redis-py's retry, whose final connection error or time-out is a :class:`RedisUnreachableError`
    naming ``url``: every command, pipeline, script and pub/sub read of a client goes through
    it, so callers see one lightning-queue error, converted in this one place."""

    def __init__(self, backoff: ExponentialBackoff, retries: int, url: str) -> None:
        super().__init__(backoff, retries)
        self._url = url

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        try:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        except (RedisUnavailableError, redis.AuthenticationError):
            raise  # already named (a nested retry gave up), or not an outage
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnreachableError(self._url, exc) from exc


def retry_policy(budget_seconds: float, url: str) -> Retry:
    """Exponential backoff (0.1, 0.2, 0.4 ... capped at 2 s between tries) with as many retries as
    fit in ``budget_seconds`` of waiting: 10 s gives 8 retries, 0 none. The final failure raises
    :class:`RedisUnreachableError` naming ``url`` (password masked)."""
    retries, waited = 0, 0.0
    while True:
        delay = backoff_delay(retries + 1)
        if waited + delay > budget_seconds:
            break
        waited += delay
        retries += 1
    return _NamingRetry(ExponentialBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE), retries, url)


def is_sentinel_url(url: str) -> bool:
    return url.startswith("sentinel://")


def _sentinel_options(url: str, master: str | None) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """The Sentinels' addresses in a Sentinel URL, the primary's name, and its credentials and db."""
    if not master:
        raise ConfigurationError(
            f"LQ_REDIS_URL {redacted_url(url)!r} is a Redis Sentinel URL: set LQ_SENTINEL_MASTER to the "
            "name the Sentinels monitor the primary under (their `sentinel monitor <name> ...`)"
        )
    hosts, password, username, db = [], None, None, 0
    for part in filter(None, url.split(";")):
        parsed = urlparse(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ConfigurationError(
                f"{redacted_url(part)!r} in LQ_REDIS_URL is not a sentinel://host:port URL; "
                "list the Sentinels as sentinel://host1:26379;sentinel://host2:26379"
            )
        hosts.append((parsed.hostname, parsed.port or 26379))
        password = password or (unquote(parsed.password) if parsed.password else None)
        username = username or (unquote(parsed.username) if parsed.username else None)
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return hosts, master, {"password": password, "username": username, "db": db}


def _ping_through(url: str, client: redis.Redis) -> None:
    try:
        client.ping()  # through the client's backoff: Redis may be starting
    except RedisUnavailableError:
        raise
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise RedisAuthError(url, exc) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailableError(url, exc) from None


def check_connection(url: str, client: redis.Redis | None = None) -> None:
    """Raise :class:`RedisAuthError`, :class:`RedisUnavailableError` or
    :class:`InvalidRedisUrlError` unless Redis at ``url`` answers a PING.

    Credentials are checked first on a connection without retries: the
    retrying client counts a refused password as a connection error and would
    spend its whole backoff on it. A Sentinel URL is checked through ``client``
    (which asked the Sentinels for the primary); without one it is left to
    first use.
    """
    if is_sentinel_url(url):
        if client is not None:
            _ping_through(url, client)
        return
    try:
        probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        raise InvalidRedisUrlError(url, exc) from None
    try:
        probe.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise RedisAuthError(url, exc) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if client is None:
            raise RedisUnavailableError(url, exc) from None
        _ping_through(url, client)
    finally:
        probe.close()


def broker_ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL, as kombu's ``broker_use_ssl`` wants them.

    redis-py reads ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile`` and
    ``ssl_keyfile`` from the URL's query itself; kombu ignores them there and,
    given no options, silently connects *without verifying* the server. This
    hands it the same options, with ``ssl_cert_reqs=required`` (redis-py's
    default) unless the URL says otherwise. ``None`` for a plain URL.
    """
    parsed = urlparse(url)
    if parsed.scheme != "rediss":
        return None
    query = dict(parse_qsl(parsed.query))
    options: dict[str, Any] = {name: query[name] for name in _SSL_QUERY_OPTIONS if name in query}
    options.setdefault("ssl_cert_reqs", "required")
    if "ssl_check_hostname" in options:  # kombu passes values on as they are: a bool, as redis-py parses it
        options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() in ("1", "true", "yes", "y", "on")
    return options


_SSL_QUERY_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False
