"""Security, against real redis-servers of the tests' own and real workers: Redis AUTH (requirepass
and an ACL user), TLS, key prefixes that cannot see each other, pickle refused, secrets never shown."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightning_queue import LLM, LightningClient, PromptTemplate, Settings
from lightning_queue.app import create_app
from lightning_queue.broker.app import celery_config
from lightning_queue.core.errors import (
    RedisAuthError,
    RedisUnavailableError,
    ResourcesNotFoundError,
    RolloutNotFoundError,
)
from lightning_queue.core.keys import ROLLOUT_TASK as TASK_NAME
from lightning_queue.ops import cli
from tests.conftest import delete_prefix
from tests.integration.private_redis import private_redis_fixture  # noqa: F401 (the private_redis fixture)
from tests.integration.security_agents import Vault

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0
PASSWORD = "Pw-lq-7c1f9e"  # the server's; never in any message
WRONG = "Wrong-pw-3d2b"


def whole_flow(settings: Settings, start_workers, rollouts: int = 4) -> None:
    """Add a snapshot, run rollouts on a real worker, read the results back."""
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="secured {x}")}, "rs-sec")
        start_workers("tests.integration.agents:echo", count=1, settings=settings)
        queued = client.enqueue_rollouts([{"x": i} for i in range(rollouts)], resources_id="rs-sec")
        done = client.wait_for_rollouts([r.rollout_id for r in queued], timeout=WAIT)
        assert [r.status for r in done] == ["succeeded"] * rollouts
        assert {r.result.output["prompt"] for r in done} == {"secured {x}"}  # type: ignore[union-attr]
        assert client.get_resources_by_id("rs-sec").version == 1


def refused_everywhere(url: str, secret: str, where: str) -> None:
    """A client, the CLI and `lightning-queue worker` all refuse ``url`` with one clear line that
    names the server and never shows ``secret``."""
    with pytest.raises(RedisAuthError) as info:
        LightningClient(Settings(redis_url=url, key_prefix=f"lqsec-{uuid.uuid4().hex[:8]}"))
    message = str(info.value)
    assert where in message and "LQ_REDIS_URL" in message and secret not in message

    result = CliRunner().invoke(cli.app, ["--redis-url", url, "resources", "list"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "refused the credentials" in result.stderr and where in result.stderr
    assert secret not in result.stderr and "Traceback" not in result.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith("LQ_")}
    worker = subprocess.run([sys.executable, "-m", "lightning_queue", "--redis-url", url, "worker", "--agent",
                             "tests.integration.agents:echo"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert worker.returncode == 1
    assert "refused the credentials" in worker.stderr and where in worker.stderr
    assert secret not in worker.stderr + worker.stdout and "Traceback" not in worker.stderr


# --------------------------------------------------------------------------- AUTH


def test_requirepass_whole_flow_and_wrong_password(private_redis, prefix: str, start_workers) -> None:
    server = private_redis(["--requirepass", PASSWORD])
    whole_flow(Settings(redis_url=server.url(password=PASSWORD), key_prefix=prefix, queue=f"{prefix}-q"),
               start_workers)
    where = f"127.0.0.1:{server.port}"
    refused_everywhere(server.url(password=WRONG), WRONG, where)
    with pytest.raises(RedisAuthError, match="refused the credentials"):  # no password at all
        LightningClient(Settings(redis_url=server.url(), key_prefix=prefix))


def acl_rule(prefix: str) -> list[str]:
    """The narrowest ACL user lightning-queue works with, confined to ``prefix``.

    Every key, ours and Celery's, starts with the prefix (kombu's global_keyprefix covers queues,
    bindings and unacked messages), and so does every channel. Redis checks PSUBSCRIBE patterns
    *literally* against the user's channel rules, so the one pattern Celery subscribes to (the
    remote-control fanout, ``{prefix}:celery:/{db}.celery.pidbox``) is listed as it is; with gossip
    on, add its event pattern the same way, or use ``&*``. Commands: all but the dangerous ones
    (FLUSHALL, CONFIG, KEYS...), plus INFO, which kombu asks for.
    """
    return ["lq", "on", f">{PASSWORD}", f"~{prefix}:*", f"&{prefix}:*", f"&{prefix}:celery:/0.celery.pidbox",
            "+@all", "-@dangerous", "+info"]


def test_acl_user_whole_flow_confined_to_its_prefix(private_redis, start_workers) -> None:
    prefix = f"lqsec-{uuid.uuid4().hex[:8]}"
    server = private_redis(["--user", "default", "off", "--user", *acl_rule(prefix),
                            "--user", "admin", "on", f">{PASSWORD}", "~*", "&*", "+@all"])
    url = server.url("lq", PASSWORD)
    whole_flow(Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q"), start_workers)

    # The user cannot read or write outside its prefix.
    import redis

    with LightningClient(Settings(redis_url=url, key_prefix="other-team")) as outsider, \
            pytest.raises(redis.exceptions.NoPermissionError):
        outsider.get_pointer("latest")

    # Nor under a prefix that starts with its own: another team's "<prefix>-secret". The rule
    # ~P:* &P:* is exact because no prefix may hold ':' (P:secret would be inside P's keyspace).
    for nested in (f"{prefix}:secret", f"{prefix}:"):
        with pytest.raises(ValueError, match="no ':'"):
            Settings(key_prefix=nested)
    secret = f"{prefix}-secret"
    with LightningClient(Settings(redis_url=server.url("admin", PASSWORD), key_prefix=secret)) as owner:
        owner.add_resources({"llm": LLM(endpoint="http://llm.local/v1", model="m", api_key=API_KEY)}, "rs-secret")
        victim = owner.enqueue_rollout({"x": 1}, resources_id="rs-secret")
        with LightningClient(Settings(redis_url=url, key_prefix=secret)) as intruder:
            for attempt in (lambda: intruder.get_resources_by_id("rs-secret"),
                            lambda: intruder.cancel_rollout(victim.rollout_id),
                            lambda: intruder.delete_resources("rs-secret", force=True)):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    attempt()
        assert owner.get_rollout(victim.rollout_id).status == "queuing"
        assert owner.get_resources_by_id("rs-secret").resources["llm"].api_key.get_secret_value() == API_KEY  # type: ignore[attr-defined]
    refused_everywhere(server.url("lq", WRONG), WRONG, f"127.0.0.1:{server.port}")
    refused_everywhere(server.url("nobody", PASSWORD), PASSWORD, f"127.0.0.1:{server.port}")


# --------------------------------------------------------------------------- TLS


def test_rediss_options_in_the_url_reach_redis_py_kombu_and_celery() -> None:
    url = "rediss://:pw@redis-host:6380/0?ssl_ca_certs=/etc/lq/ca.pem&ssl_check_hostname=false"
    conf = celery_config(Settings(redis_url=url))
    assert conf["broker_url"] == url
    assert conf["broker_use_ssl"] == {"ssl_ca_certs": "/etc/lq/ca.pem", "ssl_cert_reqs": "required",
                                      "ssl_check_hostname": False}
    # Verification stays on by default: kombu alone would fall back to CERT_NONE.
    assert celery_config(Settings(redis_url="rediss://redis-host:6380/0"))["broker_use_ssl"] == {"ssl_cert_reqs": "required"}
    assert "broker_use_ssl" not in celery_config(Settings(redis_url="redis://redis-host:6379/0"))


def test_tls_whole_flow_wrong_password_and_unknown_ca(private_redis, prefix: str, start_workers) -> None:
    server = private_redis(["--requirepass", PASSWORD], tls=True)
    url = server.url(password=PASSWORD)
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    whole_flow(Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q"), start_workers)
    where = f"127.0.0.1:{server.port}"
    refused_everywhere(server.url(password=WRONG), WRONG, where)

    # Without our CA the server's certificate is not trusted: refused, not silently accepted (and
    # refused again on every retry: a short retry budget, not the default ~10 s).
    untrusted = url.split("?", 1)[0]
    with pytest.raises(RedisUnavailableError) as info:
        LightningClient(Settings(redis_url=untrusted, key_prefix=prefix, redis_retry_seconds=0.5))
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and PASSWORD not in str(info.value)


# --------------------------------------------------------------------------- prefixes


def test_two_prefixes_on_one_redis_cannot_see_or_touch_each_other(redis_url: str, start_workers) -> None:
    team_a, team_b = (f"lqtest-{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b"))
    # Same queue name, same snapshot ids: only the prefix differs.
    a = LightningClient(Settings(redis_url=redis_url, key_prefix=team_a, queue="shared-q"))
    b = LightningClient(Settings(redis_url=redis_url, key_prefix=team_b, queue="shared-q"))
    try:
        a.add_resources({"prompt": PromptTemplate(template="team a {x}")}, "rs-shared")
        with pytest.raises(ResourcesNotFoundError):
            b.get_resources_by_id("rs-shared")
        assert b.get_latest_resources() is None and b.pointers() == {}
        b.add_resources({"prompt": PromptTemplate(template="team b {x}")}, "rs-shared")  # no clash
        assert a.get_resources_by_id("rs-shared").version == 1

        start_workers("tests.integration.agents:echo", count=1, settings=a.settings)
        ra = a.enqueue_rollouts([{"x": i} for i in range(3)], resources_id="rs-shared")
        rb = b.enqueue_rollouts([{"x": i} for i in range(3)], resources_id="rs-shared")
        done_a = a.wait_for_rollouts([r.rollout_id for r in ra], timeout=WAIT)
        assert {r.result.output["prompt"] for r in done_a} == {"team a {x}"}  # type: ignore[union-attr]
        # Team a's worker never took team b's messages, though the queue has the same name.
        assert {r.status for r in b.get_rollouts([r.rollout_id for r in rb])} == {"queuing"}
        for rid in (r.rollout_id for r in ra):
            with pytest.raises(RolloutNotFoundError):
                b.get_rollout(rid)
            with pytest.raises(RolloutNotFoundError):
                b.cancel_rollout(rid)
        assert b.query_rollouts(status="succeeded") == []
        with pytest.raises(ResourcesNotFoundError):
            b.delete_resources("rs-missing-in-b")
        b.delete_resources("rs-shared", force=True)  # b's own; a's is untouched
        assert a.get_resources_by_id("rs-shared").resources["prompt"].template == "team a {x}"  # type: ignore[attr-defined]
        assert all(r.status == "succeeded" for r in a.get_rollouts([r.rollout_id for r in ra]))
    finally:
        a.close()
        b.close()
        delete_prefix(redis_url, team_a)
        delete_prefix(redis_url, team_b)


# --------------------------------------------------------------------------- pickle


class _Exploit:
    """Unpickling this creates a directory: the proof that a worker ran code from a message."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def test_a_pickled_task_message_is_refused_and_the_worker_goes_on(
    settings: Settings, client: LightningClient, start_workers, worker_pool, tmp_path: Path
) -> None:
    client.add_resources({"prompt": PromptTemplate(template="p")})
    (worker,) = start_workers("tests.integration.agents:echo", count=1)
    evidence = tmp_path / "pwned"
    sender = create_app(settings)
    sender.send_task(TASK_NAME, kwargs={"rollout_id": _Exploit(str(evidence))}, serializer="pickle",
                     queue=settings.queue, task_id="ro-pickled")
    # Refused before Celery decodes anything, and set aside (broker/transport.py).
    worker_pool.wait_for_log("content type 'application/x-python-serialize' is not accepted", timeout=WAIT)
    assert b"ro-pickled" in b"".join(client.redis.lrange(settings.keys.dead_letters, 0, -1))

    (done,) = client.wait_for_rollouts([client.enqueue_rollout({"x": 1}).rollout_id], timeout=WAIT)
    assert done.status == "succeeded" and worker.alive
    assert not evidence.exists()


# --------------------------------------------------------------------------- secrets

API_KEY = "sk-LQSECRET-api-5be1d0"
TOKEN = "tok-LQSECRET-vault-77c2"


def test_secrets_never_appear_in_messages_logs_cli_or_errors(
    settings: Settings, client: LightningClient, start_workers, worker_pool
) -> None:
    import redis

    client.add_resources({"llm": LLM(endpoint="http://llm.local/v1", model="m", api_key=API_KEY),
                          "vault": Vault(url="https://vault.local", token=TOKEN)}, "rs-secret")
    ok, bad = client.enqueue_rollouts([{"fail": False}, {"fail": True}], resources_id="rs-secret")

    # The task messages, as they wait in the broker's queue (none taken yet: no worker runs).
    raw = redis.Redis.from_url(settings.redis_url).lrange(f"{settings.keys.celery_prefix}{settings.queue}", 0, -1)
    assert len(raw) == 2
    bodies = [base64.b64decode(json.loads(m)["body"]) for m in raw]
    seen = b"".join(raw + bodies).decode()
    assert ok.rollout_id in seen

    start_workers("tests.integration.security_agents:secret_user", count=1)
    done_ok, done_bad = client.wait_for_rollouts([ok.rollout_id, bad.rollout_id], timeout=WAIT)
    # The agent got both secrets in clear (the user resource's SecretStr too).
    assert done_ok.result.output == {  # type: ignore[union-attr]
        "api_key_sha": hashlib.sha256(API_KEY.encode()).hexdigest(),
        "token_sha": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }
    assert done_bad.status == "failed" and "upstream refused" in done_bad.error.message  # type: ignore[union-attr]
    errors = [done_bad.error.model_dump_json()] + [a.model_dump_json() for a in client.get_attempts(bad.rollout_id)]  # type: ignore[union-attr]
    worker_pool.wait_for_log(f"{bad.rollout_id}] raised expected", timeout=WAIT)

    runner = CliRunner()
    outputs = []
    for args in (["resources", "get", "rs-secret"], ["resources", "list"], ["resources", "latest"],
                 ["rollouts", "status", ok.rollout_id], ["rollouts", "status", bad.rollout_id], ["rollouts", "list"]):
        result = runner.invoke(cli.app, ["--redis-url", settings.redis_url, "--prefix", settings.key_prefix, *args])
        assert result.exit_code == 0, (args, result.output)
        outputs.append(result.output)
    assert "**********" in outputs[0]  # the secrets are shown, masked

    logs = "".join(text for _, text in worker_pool.logs())
    assert "running with" in logs  # the agent did log its resources
    for where, text in (("task messages", seen), ("worker logs", logs), ("CLI output", "".join(outputs)),
                        ("error messages", "".join(errors)), ("repr", repr(client.get_resources_by_id("rs-secret")))):
        assert API_KEY not in text, f"api_key in {where}"
        assert TOKEN not in text, f"the vault token in {where}"
