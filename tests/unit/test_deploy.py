"""deploy/ parses, names only real settings and keys, and keeps its timeouts consistent.

Each file is read as its tool reads it (YAML, systemd's INI, Redis's config, env files); where the
tool itself is installed (``docker compose``, ``kubectl``, ``redis-server``) it checks the file too.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from lightning_queue import Settings
from lightning_queue.core.keys import Keys
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.server.config import ServerConfig
from lightning_queue.storage.connections import text

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = set(Settings.model_fields) | {f"server_{name}" for name in ServerConfig.model_fields}


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def _check_settings_names(env: dict[str, Any], where: str) -> None:
    unknown = [name for name in env if name.startswith("LQ_") and name[3:].lower() not in SETTINGS]
    assert not unknown, f"{where}: {unknown} are not lightning_queue.Settings fields"


def _check_timeouts(env: dict[str, Any], stop_grace_seconds: float, where: str) -> None:
    """The chain every deployment keeps: longest rollout < stop grace, and < visibility timeout."""
    longest = float(env["LQ_DEFAULT_TIMEOUT_SECONDS"]) + float(env["LQ_HARD_TIMEOUT_GRACE_SECONDS"])
    assert longest < stop_grace_seconds, f"{where}: stop grace {stop_grace_seconds} s <= longest rollout {longest} s"
    assert longest < float(env["LQ_VISIBILITY_TIMEOUT"]), f"{where}: visibility timeout <= longest rollout"
    # Valid values, as Compose substitutes them (``${LQ_QUEUE:-lightning_queue}`` -> its default).
    Settings(**{name[3:].lower(): re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
                for name, value in env.items() if name.startswith("LQ_")})


# --------------------------------------------------------------------------- env files, redis.conf


def test_worker_env_example_names_real_settings_with_consistent_timeouts() -> None:
    env = _env_file(DEPLOY / "worker.env.example")
    _check_settings_names(env, "worker.env.example")
    assert re.match(r"redis://:[^@]+@", env["LQ_REDIS_URL"]), "the Redis URL must carry the password"
    unit = _unit("lightning-queue-worker@.service")
    _check_timeouts(env, float(unit["Service"]["TimeoutStopSec"]), "worker.env.example + worker unit")


def test_compose_env_example_sets_what_compose_requires() -> None:
    env = _env_file(DEPLOY / ".env.example")
    _check_settings_names(env, ".env.example")
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "docker-compose.yml").read_text()))
    assert required == {"REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "LQ_SERVER_PASSWORD"}
    assert required <= set(env)
    assert ":" in env["FLOWER_BASIC_AUTH"]


def _redis_conf() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in (DEPLOY / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *args = line.split()
            assert "#" not in args, f"redis.conf: Redis has no trailing comments: {line!r}"
            directives[name] = args
    return directives


def test_redis_conf_has_a_password_placeholder_aof_and_no_eviction() -> None:
    conf = _redis_conf()
    assert len(conf["requirepass"]) == 1 and "CHANGE-ME" in conf["requirepass"][0]
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    assert conf["maxmemory-policy"] == ["noeviction"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
def test_redis_server_accepts_the_conf_and_the_included_password_overrides_the_placeholder(tmp_path: Path) -> None:
    """What docker-compose.yml and k8s/redis.yaml do: the secret, written to an included file, wins."""
    (tmp_path / "requirepass.conf").write_text('requirepass "from-the-secret"\n')
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", str(DEPLOY / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path), "--include", str(tmp_path / "requirepass.conf")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def client(password: str | None) -> redis.Redis:
            # No retries: a refused connection (server still starting) is retried by the loop below.
            return redis.Redis(port=port, password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0))

        secret = client("from-the-secret")
        deadline = time.monotonic() + 30
        while True:
            try:
                assert secret.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, server.stdout.read().decode()  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert [text(v) for v in secret.config_get("appendonly").values()] == ["yes"]
        with pytest.raises(redis.AuthenticationError):
            client(_redis_conf()["requirepass"][0]).ping()  # the placeholder no longer opens it
        with pytest.raises(redis.AuthenticationError):
            client(None).ping()
    finally:
        server.terminate()
        server.wait(10)


# --------------------------------------------------------------------------- systemd


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)  # EnvironmentFile may repeat
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    text = (DEPLOY / name).read_text()
    parser.read_string(text)
    for section in ("Unit", "Service", "Install"):
        assert parser.has_section(section), f"{name}: no [{section}]"
    return parser


def test_worker_unit_stops_gracefully() -> None:
    service = _unit("lightning-queue-worker@.service")["Service"]
    assert "lightning-queue worker" in service["ExecStart"] and "%i" in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"  # Celery's warm shutdown
    assert service["KillMode"] == "mixed"  # to the main process only: pool processes finish their rollouts
    assert service["EnvironmentFile"] == "/etc/lightning-queue/worker.env"


def test_flower_and_exporter_units() -> None:
    flower_text = (DEPLOY / "lightning-queue-flower.service").read_text()
    assert "celery -A lightning_queue.app flower" in _unit("lightning-queue-flower.service")["Service"]["ExecStart"]
    assert "EnvironmentFile=/etc/lightning-queue/flower.env" in flower_text
    assert "FLOWER_BASIC_AUTH" in _env_file(DEPLOY / "flower.env.example")
    assert "lightning-queue exporter" in _unit("lightning-queue-exporter.service")["Service"]["ExecStart"]
    server_text = (DEPLOY / "lightning-queue-server.service").read_text()
    assert "lightning-queue server" in _unit("lightning-queue-server.service")["Service"]["ExecStart"]
    assert "EnvironmentFile=/etc/lightning-queue/server.env" in server_text
    server_env = _env_file(DEPLOY / "server.env.example")
    _check_settings_names(server_env, "server.env.example")
    assert server_env["LQ_SERVER_PASSWORD"] and server_env["LQ_SERVER_HOST"] == "0.0.0.0"


def test_flower_and_exporter_units_listen_on_loopback_only() -> None:
    # Flower's basic auth over plain HTTP, and an exporter without any: not on every interface.
    flower = _unit("lightning-queue-flower.service")["Service"]["ExecStart"]
    exporter = _unit("lightning-queue-exporter.service")["Service"]["ExecStart"]
    assert "--address=127.0.0.1" in flower.split()
    assert "--address 127.0.0.1" in exporter


def test_fleet_script_is_valid_bash() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    subprocess.run([bash, "-n", str(DEPLOY / "start-fleet.sh")], check=True)


# --------------------------------------------------------------------------- docker compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_services() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"redis", "worker", "flower", "exporter", "server"}

    redis_service = services["redis"]
    assert "./redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis_service["volumes"]
    assert any(v.endswith(":/data") for v in redis_service["volumes"]) and "redis-data" in compose["volumes"]
    script = redis_service["command"][-1]
    assert "requirepass" in script and "--include" in script and "$$REDIS_PASSWORD" in script

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` needs both absent"
    assert worker["command"][:2] == ["lightning-queue", "worker"]
    assert worker["stop_signal"] == "SIGTERM"
    env = worker["environment"]
    _check_settings_names(env, "docker-compose.yml")
    assert env["LQ_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
    _check_timeouts(env, float(worker["stop_grace_period"].removesuffix("s")), "docker-compose.yml worker")

    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "lightning_queue.app", "flower"]
    assert services["exporter"]["command"][:2] == ["lightning-queue", "exporter"]
    assert services["server"]["command"][:2] == ["lightning-queue", "server"]
    assert "LQ_SERVER_PASSWORD" in services["server"]["environment"]  # it listens beyond loopback
    for name in ("worker", "flower", "exporter", "server"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_publishes_flower_and_the_exporter_on_loopback_only() -> None:
    services = _compose()["services"]
    for name, port in (("flower", 5555), ("exporter", 9808)):
        assert services[name]["ports"] == [f"127.0.0.1:{port}:{port}"], name
    for name, service in services.items():  # nothing else is published on every interface either
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), (name, published)


def test_exporter_listens_on_loopback_unless_told_otherwise() -> None:
    import inspect

    from lightning_queue.ops.cli.exporter import exporter
    from lightning_queue.ops.monitoring import Exporter

    assert inspect.signature(Exporter).parameters["address"].default == "127.0.0.1"
    assert inspect.signature(exporter).parameters["address"].default == "127.0.0.1"


def test_dockerfile_installs_the_package_and_stops_warm() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install \"?\.", dockerfile, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["lightning-queue", "worker"', dockerfile, re.MULTILINE)
    assert re.search(r"^USER ", dockerfile, re.MULTILINE), "workers should not run as root"


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], check=False, capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    command = _compose_command()
    assert command is not None
    env_file = tmp_path / "env"
    env_file.write_text("REDIS_PASSWORD=abc123\nFLOWER_BASIC_AUTH=admin:pw\n")
    base = [*command, "-f", str(DEPLOY / "docker-compose.yml"), "--env-file"]
    result = subprocess.run([*base, str(env_file), "config"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["worker"]["environment"]["LQ_REDIS_URL"] == "redis://:abc123@redis:6379/0"
    # Without a password compose refuses to start anything.
    (tmp_path / "empty").write_text("")
    result = subprocess.run([*base, str(tmp_path / "empty"), "config"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr


# --------------------------------------------------------------------------- Kubernetes


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource in deploy/k8s, by (kind, name)."""
    resources = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            resources[(doc["kind"], doc["metadata"]["name"])] = doc
    return resources


def _container(resources: dict, kind: str, name: str) -> dict[str, Any]:
    (container,) = resources[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_manifests_are_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for doc in _k8s().values():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no bundled schema (checked field by field below)
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_settings_and_timeouts() -> None:
    resources = _k8s()
    settings = resources[("ConfigMap", "lightning-queue")]["data"]
    _check_settings_names(settings, "k8s/configmap.yaml")
    worker = resources[("Deployment", "lightning-queue-worker")]["spec"]["template"]["spec"]
    _check_timeouts(settings, worker["terminationGracePeriodSeconds"], "k8s worker")
    for kind, name in [("Deployment", "lightning-queue-worker"), ("Deployment", "flower"),
                       ("Deployment", "lightning-queue-exporter"), ("Deployment", "lightning-queue-server")]:
        container = _container(resources, kind, name)
        assert container["image"] == "lightning-queue"  # set by kustomization.yaml's images
        assert container["envFrom"] == [{"configMapRef": {"name": "lightning-queue"}}]
        env = _env(container)
        _check_settings_names(env, f"k8s {name}")
        # $(REDIS_PASSWORD) is expanded by Kubernetes only if defined before it.
        names = [e["name"] for e in container["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("LQ_REDIS_URL")
        assert env["LQ_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
        assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "lightning-queue-redis", "key": "password"}}
    assert _container(resources, "Deployment", "lightning-queue-worker")["command"][:2] == ["lightning-queue", "worker"]


def test_k8s_redis_has_a_password_and_persistence() -> None:
    resources = _k8s()
    statefulset = resources[("StatefulSet", "redis")]
    container = _container(resources, "StatefulSet", "redis")
    assert _env(container)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "lightning-queue-redis", "key": "password"}}
    assert "password" in resources[("Secret", "lightning-queue-redis")]["stringData"]
    assert "--include" in container["command"][-1] and "/etc/redis/redis.conf" in container["command"][-1]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert resources[("Service", "redis")]["spec"]["ports"][0]["port"] == 6379
    conf = resources[("ConfigMap", "lightning-queue-redis-conf")]["data"]["redis.conf"]
    assert conf == (DEPLOY / "redis.conf").read_text(), "k8s/redis-conf.yaml must be a copy of deploy/redis.conf"


def test_k8s_server_is_behind_basic_auth() -> None:
    resources = _k8s()
    container = _container(resources, "Deployment", "lightning-queue-server")
    assert container["command"][:2] == ["lightning-queue", "server"] and "0.0.0.0" in container["command"]
    password = _env(container)["LQ_SERVER_PASSWORD"]["secretKeyRef"]
    assert resources[("Secret", password["name"])]["stringData"][password["key"]]


def test_k8s_flower_is_behind_basic_auth() -> None:
    resources = _k8s()
    container = _container(resources, "Deployment", "flower")
    assert container["command"][:4] == ["celery", "-A", "lightning_queue.app", "flower"]
    auth = _env(container)["FLOWER_BASIC_AUTH"]["secretKeyRef"]
    assert ":" in resources[("Secret", auth["name"])]["stringData"][auth["key"]]


def test_k8s_flower_and_exporter_are_cluster_internal_and_fenced_by_network_policies() -> None:
    resources = _k8s()
    for service in ("flower", "lightning-queue-exporter"):
        assert resources[("Service", service)]["spec"].get("type", "ClusterIP") == "ClusterIP", service
    exporter = resources[("NetworkPolicy", "lightning-queue-exporter")]["spec"]
    assert exporter["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "lightning-queue-exporter"}
    (rule,) = exporter["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [{"app.kubernetes.io/name": "prometheus"}]
    flower = resources[("NetworkPolicy", "flower")]["spec"]
    assert flower["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "flower"}
    assert flower["policyTypes"] == ["Ingress"] and flower["ingress"] == []
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "network-policy.yaml" in kustomization["resources"]


def test_keda_scales_workers_on_the_exact_queue_key() -> None:
    resources = _k8s()
    scaled = resources[("ScaledObject", "lightning-queue-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "lightning-queue-worker"
    assert ("Deployment", "lightning-queue-worker") in resources
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    settings = resources[("ConfigMap", "lightning-queue")]["data"]
    # The list kombu writes for the configured prefix and queue, which are also the defaults.
    assert meta["listName"] == Keys(settings["LQ_KEY_PREFIX"]).celery_queue(settings["LQ_QUEUE"])
    defaults = Settings.model_fields
    assert meta["listName"] == Keys(defaults["key_prefix"].default).celery_queue(defaults["queue"].default)
    assert meta["address"] == "redis:6379" and int(meta["listLength"]) >= 1
    auth = resources[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "password", "name": "lightning-queue-redis", "key": "password"}]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_manifests() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout))
    assert kinds.count("Deployment") == 4 and "StatefulSet" in kinds and "ScaledObject" in kinds


# --------------------------------------------------------------------------- Grafana


def _exported_sample_names(client: Any) -> dict[str, set[str]]:
    """Every sample name the exporter can export (by family type, whether or not it has samples now),
    with the label names of its family."""
    from lightning_queue.ops.monitoring import LightningCollector

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
                "gauge": ("",)}
    names: dict[str, set[str]] = {}
    for family in LightningCollector(client).collect():
        labels = {name for sample in family.samples for name in sample.labels} | {"le"}
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels
    return names


def test_the_grafana_dashboard_queries_only_metrics_the_exporter_exports(fake_client: Any) -> None:
    from lightning_queue import Rollout, RolloutResult

    # One finished rollout on a snapshot, so the per-version families have samples (and label names).
    store = fake_client.store
    rollout = Rollout(input={})
    store.create_rollouts([rollout])
    claim = store.claim(rollout, "w@h")
    store.start_attempt(rollout.rollout_id, claim.sequence_id, "rs", 1)
    store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                         result=RolloutResult(reward=1.0))
    exported = _exported_sample_names(fake_client)

    dashboard = json.loads((DEPLOY / "grafana" / "lightning-queue.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) > 10
    named = {name for expr in exprs for name in re.findall(r"\blq_[a-z_]+", expr)}
    assert named - set(exported) == set(), "the dashboard queries metrics the exporter does not export"
    # What the issue asks the dashboard to show.
    for needed in ("lq_rollouts_finished_total", "lq_rollout_duration_seconds_bucket",
                   "lq_rollout_queue_wait_seconds_bucket", "lq_snapshot_reward_sum", "lq_variant_reward_sum",
                   "lq_queue_messages", "lq_snapshot_cache_hits_total"):
        assert needed in named, needed
    assert any("histogram_quantile" in e for e in exprs)
    # Every selector filters on the prefix; label names it groups by exist on the metric (where known).
    for expr in exprs:
        for name, matchers in re.findall(r"\b(lq_[a-z_]+)\{([^}]*)\}", expr):
            assert 'prefix="$prefix"' in matchers, expr
            labels = exported[name]
            if len(labels) > 2:  # the family had samples: its label names are known
                assert {m.split("=")[0].strip() for m in matchers.split(",")} <= labels, expr
