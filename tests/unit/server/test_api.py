"""The server's JSON API on fakeredis: what each route answers, who may call it, what it never shows."""

from __future__ import annotations

import base64
import threading
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient

from lightning_queue import LLM, LightningClient, PromptTemplate
from lightning_queue.core.errors import ServerCredentialsError
from lightning_queue.ops.server import ServerConfig, create_app
from tests.unit.server.conftest import API_KEY, PASSWORD, TOKEN, app_client, finish

BASIC = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def test_snapshots_list_versions_and_show_each_resource_with_its_secret_masked(loopback: TestClient) -> None:
    page = loopback.get("/api/v1/snapshots").json()
    assert [s["resources_id"] for s in page["items"]] == ["rs-b", "rs-a"] and page["total"] == 2
    assert page["items"][1]["pointers"] == ["prod"] and page["items"][0]["pointers"] == ["latest"]
    assert page["items"][1]["resource_types"] == {"llm": "llm", "prompt": "prompt_template"}
    versions = loopback.get("/api/v1/snapshots/rs-a/versions").json()
    assert versions["current"] == 2 and [v["version"] for v in versions["versions"]] == [2, 1]
    first = loopback.get("/api/v1/snapshots/rs-a", params={"version": 1}).json()
    assert first["version"] == 1 and first["current_version"] == 2
    assert first["resources"]["llm"]["api_key"] == "**********" and first["resources"]["llm"]["model"] == "m1"
    assert loopback.get("/api/v1/snapshots/prod").json()["resources_id"] == "rs-a"  # a pointer is followed


def test_a_diff_shows_what_changed_word_by_word(loopback: TestClient) -> None:
    diff = loopback.get("/api/v1/snapshots/rs-a/diff").json()  # v1 -> v2 by default
    assert (diff["left"]["version"], diff["right"]["version"]) == (1, 2)
    changes = {c["path"]: c for c in diff["changes"]}
    assert set(changes) == {"llm.model", "prompt.template"}
    assert (changes["llm.model"]["old"], changes["llm.model"]["new"]) == ("m1", "m2")
    inserted = "".join(s["text"] for s in changes["prompt.template"]["segments"] if s["op"] == "insert")
    assert inserted.strip() == "Think step by step." and not any(
        s["op"] == "delete" for s in changes["prompt.template"]["segments"])
    across = loopback.get("/api/v1/snapshots/rs-a/diff", params={"against": "rs-b"}).json()
    assert across["right"] == {"resources_id": "rs-b", "version": 1}


def test_a_changed_secret_is_reported_but_never_shown(seeded: LightningClient, loopback: TestClient) -> None:
    seeded.update_resources("rs-b", {"llm": LLM(endpoint="http://llm.local/v1", model="m1", api_key="sk-rotated"),
                                     "prompt": PromptTemplate(template="b {question}")})
    response = loopback.get("/api/v1/snapshots/rs-b/diff")
    (change,) = response.json()["changes"]
    assert change["path"] == "llm.api_key" and change["secret"] and change["old"] == change["new"] == "**********"
    assert API_KEY not in response.text and "sk-rotated" not in response.text


def test_pointers_move_and_roll_back_under_the_clients_rules(loopback: TestClient, seeded: LightningClient) -> None:
    history = loopback.get("/api/v1/pointers/prod/history").json()
    assert [(m["from_id"], m["to_id"]) for m in history] == [("rs-b", "rs-a"), ("rs-a", "rs-b"), (None, "rs-a")]
    moved = loopback.put("/api/v1/pointers/prod", json={"target": "rs-b", "expected": "rs-a"}, headers=BASIC)
    assert moved.status_code == 200 and moved.json() == {"name": "prod", "target": "rs-b"}
    assert seeded.pointer_history("prod", 1)[0].by == "server:admin"
    stale = loopback.put("/api/v1/pointers/prod", json={"target": "rs-a", "expected": "rs-a"}, headers=BASIC)
    assert stale.status_code == 409 and stale.json()["error"] == "PointerError"
    missing = loopback.put("/api/v1/pointers/prod", json={"target": "rs-nope"}, headers=BASIC)
    assert missing.status_code == 404 and "rs-nope" in missing.json()["detail"]
    taken = loopback.put("/api/v1/pointers/rs-a", json={"target": "rs-b"}, headers=BASIC)
    assert taken.status_code == 409 and "id of a snapshot" in taken.json()["detail"]
    back = loopback.post("/api/v1/pointers/prod/rollback", headers=BEARER)
    assert back.status_code == 200 and (back.json()["from_id"], back.json()["to_id"]) == ("rs-b", "rs-a")
    assert seeded.get_pointer("prod") == "rs-a"
    nothing = loopback.post("/api/v1/pointers/never-set/rollback", headers=BEARER)
    assert nothing.status_code == 409 and "no earlier target" in nothing.json()["detail"]


def test_changes_need_credentials_even_on_loopback(loopback: TestClient, seeded: LightningClient) -> None:
    anonymous = loopback.post("/api/v1/pointers/prod/rollback")
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert anonymous.json()["error"] == "AuthenticationRequiredError"
    wrong = loopback.post("/api/v1/pointers/prod/rollback", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert seeded.get_pointer("prod") == "rs-a"
    assert loopback.get("/api/v1/pointers").status_code == 200  # reads are anonymous on loopback


def test_a_change_from_another_origin_is_refused(loopback: TestClient, seeded: LightningClient) -> None:
    forged = loopback.post("/api/v1/pointers/prod/rollback", headers={**BASIC, "Origin": "http://evil.example"})
    assert forged.status_code == 403 and forged.json()["error"] == "CrossSiteRequestError"
    cross = loopback.post("/api/v1/pointers/prod/rollback", headers={**BASIC, "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert seeded.get_pointer("prod") == "rs-a"
    own = loopback.post("/api/v1/pointers/prod/rollback", headers={**BASIC, "Origin": "http://127.0.0.1:8780",
                                                                   "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200
    # No CORS unless origins are listed: a preflight from elsewhere gets no allow header.
    preflight = loopback.options("/api/v1/pointers/prod/rollback", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_listed_origins_get_cors(seeded: LightningClient, fake_redis: fakeredis.FakeRedis) -> None:
    with app_client(seeded, fake_redis, password=PASSWORD, cors_origins=["http://ui.example"]) as http:
        preflight = http.options("/api/v1/pointers/prod/rollback", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        assert http.post("/api/v1/pointers/prod/rollback", headers={**BASIC, "Origin": "http://ui.example"}).status_code == 200


def test_beyond_loopback_every_request_needs_credentials(exposed: TestClient) -> None:
    paths = ["/", "/static/app.js", "/api/v1/openapi.json", "/api/v1/snapshots", "/api/v1/snapshots/rs-a",
             "/api/v1/pointers", "/api/v1/rollouts", "/api/v1/experiments/ab", "/api/v1/workers", "/api/v1/overview",
             "/api/v1/events", "/api/v1/no-such-route"]
    wrong = [{}, {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()},
             {"Authorization": "Basic " + base64.b64encode(f"root:{PASSWORD}".encode()).decode()},
             {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!!"}, {"Authorization": TOKEN}]
    for path in paths:
        for headers in wrong:
            response = exposed.get(path, headers=headers)
            assert response.status_code == 401, (path, headers, response.status_code)
    for path in paths[:-2]:
        assert exposed.get(path, headers=BASIC).status_code == 200, path
        assert exposed.get(path, headers=BEARER).status_code == 200, path


def test_listening_beyond_loopback_without_credentials_is_refused(seeded: LightningClient) -> None:
    with pytest.raises(ServerCredentialsError, match="LQ_SERVER_PASSWORD"):
        create_app(ServerConfig(host="0.0.0.0"), client=seeded)
    app = create_app(ServerConfig(host="127.0.0.1"), client=seeded)  # on loopback a password is made up
    assert app.state.generated_password and app.state.services.config.password is not None


def test_rollouts_page_by_cursor_and_filter(loopback: TestClient, seeded: LightningClient) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = loopback.get("/api/v1/rollouts", params={"limit": 7, **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["rollout_id"] for r in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # A rollout enqueued while paging goes to the top: it shifts nothing.
        if pages == 2:
            seeded.enqueue_rollouts([{"late": True}])
    assert len(seen) == len(set(seen)) == 85 and pages == 13
    times = [r.enqueue_time for r in seeded.get_rollouts(seen)]
    assert times == sorted(times, reverse=True)
    failed = loopback.get("/api/v1/rollouts", params={"status": "failed"}).json()["items"]
    assert [r["error_type"] for r in failed] == ["ToolError"]
    mixed = loopback.get("/api/v1/rollouts", params=[("status", "failed"), ("status", "queuing")]).json()["items"]
    assert len(mixed) == 7  # 1 failed, 5 + 1 queuing
    val = loopback.get("/api/v1/rollouts", params={"mode": "val", "resources_id": "rs-b"}).json()["items"]
    assert len(val) == 5 and {r["resources_id"] for r in val} == {"rs-b"}
    treatment = loopback.get("/api/v1/rollouts", params={"experiment": "ab", "variant": "treatment",
                                                         "status": "succeeded"}).json()["items"]
    assert treatment and {(r["experiment"], r["variant"]) for r in treatment} == {("ab", "treatment")}
    assert loopback.get("/api/v1/rollouts", params={"experiment": "nope"}).status_code == 404
    bad = loopback.get("/api/v1/rollouts", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and bad.json()["error"] == "InvalidCursorError"


def test_rollouts_take_the_whole_rollout_filter(loopback: TestClient, seeded: LightningClient) -> None:
    tagged = seeded.enqueue_rollouts([{"t": i} for i in range(3)], metadata={"user": "alice", "n": 2})
    listed = loopback.get("/api/v1/rollouts", params={"metadata": ["user=alice", "n=2"], "newest_first": "false"})
    assert [r["rollout_id"] for r in listed.json()["items"]] == [r.rollout_id for r in tagged]
    assert loopback.get("/api/v1/rollouts", params={"metadata": "user=bob"}).json()["items"] == []
    after = loopback.get("/api/v1/rollouts", params={"enqueued_after": tagged[1].enqueue_time}).json()["items"]
    assert {r["rollout_id"] for r in after} >= {tagged[1].rollout_id, tagged[2].rollout_id}
    assert all(r["enqueue_time"] >= tagged[1].enqueue_time for r in after)
    ended = loopback.get("/api/v1/rollouts", params={"order_by": "end_time"}).json()["items"]
    assert ended and all(r["end_time"] is not None for r in ended)
    assert [r["end_time"] for r in ended] == sorted((r["end_time"] for r in ended), reverse=True)
    for params in ({"variant": "treatment"}, {"metadata": "no-equals-sign"}):
        refused = loopback.get("/api/v1/rollouts", params=params)
        assert refused.status_code == 400 and refused.json()["error"] == "InvalidFilterError", params


def test_a_rollout_shows_its_attempts_and_trace(loopback: TestClient) -> None:
    (first,) = loopback.get("/api/v1/rollouts", params={"status": "succeeded", "limit": 1}).json()["items"]
    detail = loopback.get(f"/api/v1/rollouts/{first['rollout_id']}").json()
    assert detail["rollout"]["status"] == "succeeded" and detail["trace"] == [{"name": "llm", "tokens": 3}]
    (attempt,) = detail["attempts"]
    assert attempt["worker_id"] == "sim@host" and attempt["status"] == "succeeded" and detail["spans"] is None
    missing = loopback.get("/api/v1/rollouts/ro-nope")
    assert missing.status_code == 404 and missing.json()["error"] == "RolloutNotFoundError"


def test_an_experiment_shows_its_live_report_and_is_promoted(loopback: TestClient, seeded: LightningClient) -> None:
    view = loopback.get("/api/v1/experiments/ab").json()
    control, treatment = view["report"]["variants"]
    assert control["finished"] + treatment["finished"] == 80 and control["failed"] + treatment["failed"] == 1
    assert view["report"]["winner"] == "treatment"
    (comparison,) = view["report"]["comparisons"]
    assert comparison["verdict"] == "better" and comparison["sequential"]["p_value"] < 0.05
    points = view["trajectories"]["treatment"]
    assert points[-1]["n"] == treatment["succeeded"] and points[-1]["mean"] == pytest.approx(0.9)
    assert loopback.get("/api/v1/experiments").json()[0]["name"] == "ab"
    promoted = loopback.post("/api/v1/experiments/ab/promote", json={"pointer": "prod"}, headers=BASIC)
    assert promoted.status_code == 200 and promoted.json()["winner"] == "treatment"
    assert seeded.get_pointer("prod") == "rs-b"
    again = loopback.post("/api/v1/experiments/ab/stop", json={}, headers=BASIC)
    assert again.status_code == 409 and again.json()["error"] == "ExperimentStateError"


def test_stop_an_experiment(loopback: TestClient) -> None:
    stopped = loopback.post("/api/v1/experiments/ab/stop", json={"reason": "enough"}, headers=BASIC)
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert loopback.get("/api/v1/experiments/ab").json()["experiment"]["stop_reason"] == "enough"


def test_workers_and_overview(loopback: TestClient, seeded: LightningClient) -> None:
    from lightning_queue.storage.liveness import HealthRecorder

    HealthRecorder(seeded.redis, seeded.keys, "w1@host", ttl=60).report(["q"], ["q"], 1, 2)
    fleet = loopback.get("/api/v1/workers").json()
    assert [w["hostname"] for w in fleet["workers"]] == ["w1@host"] and fleet["stalled"] == []
    overview = loopback.get("/api/v1/overview").json()
    assert overview["statuses"]["queuing"] == 5 and overview["workers"] == 1 and overview["pointers"]["prod"] == "rs-a"


def test_the_page_and_its_files_are_served_with_a_strict_policy(loopback: TestClient) -> None:
    page = loopback.get("/")
    assert page.status_code == 200 and '<script type="module" src="/static/app.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "lib.js", "charts.js", "snapshots.js", "pointers.js", "experiments.js", "rollouts.js",
                 "workers.js", "style.css"):
        assert loopback.get(f"/static/{name}").status_code == 200, name
    assert loopback.get("/api/v1/snapshots").headers["cache-control"] == "no-store"


def test_no_secret_in_any_response(seeded: LightningClient, fake_redis: fakeredis.FakeRedis) -> None:
    """Every GET route of the schema, with the ids that exist, and every change, searched for secrets."""
    secrets = [API_KEY, PASSWORD, TOKEN]
    with app_client(seeded, fake_redis, host="0.0.0.0", password=PASSWORD, token=TOKEN, stream_seconds=0.5) as http:
        bodies: list[str] = []
        schema = http.get("/api/v1/openapi.json", headers=BASIC)
        bodies.append(schema.text)
        rollout_id = http.get("/api/v1/rollouts", headers=BASIC).json()["items"][0]["rollout_id"]
        values = {"resources_id": "rs-a", "name": "ab", "rollout_id": rollout_id}
        for path, item in schema.json()["paths"].items():
            if "get" in item:
                url = path.format(**{k: values.get(k, "prod") for k in values} | {"name": "prod" if "pointers" in path else "ab"})
                response = http.get(url, headers=BASIC)
                assert response.status_code == 200, url
                bodies.append(response.text)
        bodies += [http.get(u, headers=BASIC).text for u in ("/", "/static/app.js", "/api/v1/snapshots/rs-a?version=1",
                                                               "/api/v1/snapshots/rs-a/diff?against=rs-b")]
        for headers in ({}, {"Authorization": "Bearer wrong"}, BASIC):
            bodies.append(http.put("/api/v1/pointers/prod", json={"target": "rs-b"}, headers=headers).text)
            bodies.append(http.post("/api/v1/experiments/ab/promote", json={"variant": "control"}, headers=headers).text)
        for body in bodies:
            for secret in secrets:
                assert secret not in body


def test_the_event_stream_tells_of_finished_rollouts_and_registry_changes(
    seeded: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    (queued,) = seeded.enqueue_rollouts([{"q": "x"}])
    with app_client(seeded, fake_redis, password=PASSWORD, stream_seconds=5.0) as http:
        seen: list[str] = []
        with http.stream("GET", "/api/v1/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    seen.append(line.split(":", 1)[1].strip())
                if seen == ["hello"]:
                    # Only once subscribed: the change happens while the stream listens.
                    threading.Thread(target=lambda: (finish(seeded, [queued], lambda r: ("succeeded", 1.0)),
                                                     seeded.set_pointer("prod", "rs-b"))).start()
                    seen.append("changed")
                if line.startswith("data:") and queued.rollout_id in line:
                    seen.append("id")
                if "rollouts" in seen and "registry" in seen:
                    break
        assert {"rollouts", "registry", "id"} <= set(seen)


async def test_the_stream_subscribes_again_after_a_lost_connection_and_says_resync(prefix: str) -> None:
    """A dropped Redis connection: the stream says offline, subscribes again, and tells the page to re-read
    (changes meanwhile were not seen); it ends by itself at its deadline."""
    import redis as redis_module

    from lightning_queue.core.keys import Keys
    from lightning_queue.ops.server.events import change_stream

    server = fakeredis.FakeServer()
    subscribes = []

    class Flaky(fakeredis.FakeAsyncRedis):
        def pubsub(self, **kwargs: Any) -> Any:
            pubsub = super().pubsub(**kwargs)
            subscribe = pubsub.subscribe

            async def once_broken(*channels: Any) -> Any:
                subscribes.append(channels)
                if len(subscribes) == 2:
                    raise redis_module.ConnectionError("connection reset")
                return await subscribe(*channels)

            pubsub.subscribe = once_broken
            return pubsub

    client = Flaky(server=server)
    keys = Keys(prefix)
    seen = []
    stream = change_stream(lambda: client, keys, seconds=3.0)
    async for event in stream:
        seen.append(event.event)
        if event.event == "hello":
            await client.publish(keys.events, "ro-1")
        if event.event == "rollouts":
            # Drop the subscription as a lost connection would: the next read fails.
            await stream.athrow(redis_module.ConnectionError("lost"))  # type: ignore[attr-defined]
        if event.event == "resync":
            break
    assert seen[:2] == ["hello", "rollouts"] and "offline" in seen and seen[-1] == "resync"
