"""The embedded Redis-compatible server the demo and the tests start when no Redis is reachable."""

from __future__ import annotations

import atexit
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from lightning_queue.core.errors import ConfigurationError, RedisUnavailableError, redacted_url
from lightning_queue.storage.connections import ping

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedRedis:
    """A Redis-compatible server this process started, and stops at exit.

    A real ``redis-server`` binary is used when one is installed (fast);
    otherwise fakeredis's TCP server runs in a thread of this process (slow,
    but needs nothing beyond pip). Nothing is persisted either way.
    """

    url: str
    kind: str
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _server: object | None = field(default=None, repr=False)
    _tmpdir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, prefer_binary: bool = True) -> EmbeddedRedis:
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        binary = shutil.which("redis-server") if prefer_binary else None
        if binary:
            tmpdir = tempfile.TemporaryDirectory(prefix="lq-redis-")
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", tmpdir.name, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            server = cls(url=url, kind="redis-server", _process=process, _tmpdir=tmpdir)
        else:
            import threading

            try:
                from fakeredis import TcpFakeServer
            except ImportError:
                raise ConfigurationError(
                    "no Redis is reachable, no redis-server binary is installed, and the embedded server is not: "
                    "install it with `pip install 'lightning-queue[embedded]'` (the demo extra includes it), or "
                    "start a Redis server and point LQ_REDIS_URL at it"
                ) from None

            tcp = TcpFakeServer(("127.0.0.1", port), server_type="redis")
            tcp.daemon_threads = True
            threading.Thread(target=tcp.serve_forever, name="lq-embedded-redis", daemon=True).start()
            server = cls(url=url, kind="fakeredis", _server=tcp)
        deadline = time.monotonic() + 10
        while not ping(url, timeout=0.2):
            if time.monotonic() > deadline:
                server.stop()
                raise RedisUnavailableError(url, RuntimeError(f"embedded {server.kind} did not start"))
            time.sleep(0.05)
        atexit.register(server.stop)
        return server

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def ensure_redis(url: str, prefer_binary: bool = True) -> tuple[str, EmbeddedRedis | None]:
    """Return ``url`` when it answers; otherwise start an embedded server and return its URL
    and the server (the caller tells the user: this function does not, so it is said once)."""
    if ping(url):
        return url, None
    log.info("no Redis at %s; starting an embedded one", redacted_url(url))
    server = EmbeddedRedis.start(prefer_binary=prefer_binary)
    return server.url, server
