"""Flower sees every rollout as a task named after it, with its ids as arguments, behind basic auth."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lightning_queue import (
    LLM,
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    Settings,
)
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import worker_env

REPO_ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "ops", "s3cret-flower-pw"


def _request(url: str, auth: tuple[str, str] | None) -> urllib.request.Request:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    return request


def _get(url: str, auth: tuple[str, str] = (USER, PASSWORD)) -> dict:
    with urllib.request.urlopen(_request(url, auth), timeout=5) as response:
        return json.loads(response.read())


def _status_of(url: str, auth: tuple[str, str] | None) -> int:
    try:
        with urllib.request.urlopen(_request(url, auth), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flower_shows_rollouts_with_their_ids_and_outcome(
    settings: Settings, client: LightningClient, start_workers, tmp_path: Path
) -> None:
    llm = LLM(endpoint="http://llm.invalid/v1", model="m", api_key="sk-secret-flower")
    client.add_resources({"prompt": PromptTemplate(template="{x}"), "llm": llm}, "rs-flower")
    port = free_port()
    # Configured as deploy/ does it: basic auth from the environment (FLOWER_BASIC_AUTH=user:password).
    env = {**worker_env(settings, None), "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "lightning_queue.app", "flower",
                                   f"--port={port}", "--address=127.0.0.1"],
                                  cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/api/tasks")
                break
            except OSError:
                assert flower.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.2)
        # Nobody gets in without the password: neither the API nor the dashboard.
        for path in ("/api/tasks", "/api/workers", "/"):
            assert _status_of(f"http://127.0.0.1:{port}{path}", None) == 401, path
            assert _status_of(f"http://127.0.0.1:{port}{path}", (USER, "wrong")) == 401, path
        assert _status_of(f"http://127.0.0.1:{port}/", (USER, PASSWORD)) == 200
        start_workers("tests.integration.agents:failing", count=1)
        ok = client.enqueue_rollout({"name": "x"}, resources_id="rs-flower", config=RolloutConfig(max_attempts=1))
        client.wait_for_rollouts([ok.rollout_id], timeout=30)

        deadline = time.monotonic() + 30
        while True:  # Flower learns of tasks from the event stream, a moment later
            tasks = _get(f"http://127.0.0.1:{port}/api/tasks")
            task = tasks.get(ok.rollout_id)
            if task and task.get("state") == "FAILURE":
                break
            assert time.monotonic() < deadline, json.dumps(tasks)[:2000]
            time.sleep(0.3)
        assert task["name"] == "lightning_queue.rollout"
        assert ok.rollout_id in task["kwargs"] and "rs-flower" in task["kwargs"]
        assert "RolloutFailed" in task["exception"] and "boom on x" in task["exception"]
        assert "sk-secret-flower" not in json.dumps(tasks)  # messages carry ids, never resources
    finally:
        flower.terminate()
        flower.wait(10)
