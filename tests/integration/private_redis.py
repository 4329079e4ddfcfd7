"""A ``redis-server`` of the test's own, for what the shared one cannot show: AUTH, ACL users,
TLS, restarts. Tests using it skip cleanly when no ``redis-server`` binary is installed."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import pytest

from lightning_queue.ops.embedded import free_port

READY = "Ready to accept connections"


class PrivateRedis:
    """One ``redis-server`` on a free loopback port, its files in ``directory``.

    ``tls`` makes it listen with TLS only (a CA and server certificate are generated
    in ``directory``); ``args`` are more ``redis-server`` options (``--requirepass``,
    ``--user``, ``--appendonly yes``...). :meth:`restart` keeps the directory, so an
    append-only file survives it.
    """

    def __init__(self, directory: Path, args: Sequence[str] = (), tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("needs a redis-server binary")
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        argv = [binary, "--bind", "127.0.0.1", "--dir", str(directory), "--save", "", "--loglevel", "notice",
                "--logfile", str(directory / "redis.log")]
        if tls:
            self.ca, cert, key = make_certificates(directory)
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        self.argv = [*argv, *args]
        self.process: subprocess.Popen | None = None

    def url(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        creds = ""
        if password is not None:
            creds = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        scheme = "rediss" if self.tls else "redis"
        query = f"?ssl_ca_certs={self.ca}" if self.tls else ""
        return f"{scheme}://{creds}127.0.0.1:{self.port}/{db}{query}"

    def start(self, timeout: float = 20.0) -> PrivateRedis:
        """Start it and wait until it logs that it accepts connections (it may want credentials
        the test has not given yet, so no PING)."""
        ready_before = self.log().count(READY)
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.log().count(READY) == ready_before:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
            assert time.monotonic() < deadline, f"redis-server not ready in {timeout} s: {self.log()[-2000:]}"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: redis-server writes its append-only file out and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)  # how long it stays down, not a correctness condition
        self.start()

    def log(self) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return ""


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for localhost/127.0.0.1 it signed (cryptography)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lightning-queue test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(name="private_redis")
def private_redis_fixture(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """``private_redis(args=[...], tls=False)`` starts a server of the test's own; all are stopped after.
    Import ``private_redis_fixture`` into a test module to use it."""
    servers: list[PrivateRedis] = []

    def start(args: Sequence[str] = (), tls: bool = False) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers) + 1}"
        directory.mkdir()
        server = PrivateRedis(directory, args, tls)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
