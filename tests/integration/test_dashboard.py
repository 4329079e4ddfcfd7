"""The dashboard in a real browser (the distribution's headless Chromium, driven by Playwright)
against real workers: the demo's prompt search, then on the page the snapshots and a version
diff, a pointer moved and rolled back from the page, an experiment's charts updating while its
rollouts finish, and a rollout's detail. Screenshots go to a directory the test prints; the last
of each page is copied to docs/screenshots/ when LQ_UPDATE_SCREENSHOTS is set."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from lightning_queue import PromptTemplate
from lightning_queue.experiments.manager import Experiment, Experiments, Variant
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.search import prompt_search
from lightning_queue.ops.server import ServerConfig, create_app
from tests.integration.dashboard import CHROMIUM, CHROMIUM_ARGS, require_browser, serving

DEMO_AGENT = "lightning_queue.ops.demo.agent:agent"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PASSWORD = "dashboard-test-password"
TIMEOUT_MS = 30_000


@pytest.fixture
def shots(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\nscreenshots: {folder}")
    taken: dict[str, Path] = {}

    def shoot(page: Any, name: str) -> None:
        path = folder / f"{len(taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken[name] = path

    shoot.taken = taken  # type: ignore[attr-defined]
    return shoot


def test_the_dashboard_shows_the_demo_flow_live(shared_workers: Any, shots: Any) -> None:
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    share = shared_workers(DEMO_AGENT, count=2, heartbeat_interval=1.0)  # health records within a second
    client = share.client
    train, val = arithmetic("train"), arithmetic("val")
    report = prompt_search(client, train[:6], val[:4], timeout=120)  # the demo's flow, on the shared fleet
    ids = {s.name: s.resources_id for s in report.scores}
    plain, terse = ids["plain"], ids["step-by-step-terse"]
    # A second version whose template changed, for the diff.
    client.update_resources(plain, {"prompt": PromptTemplate(template="Think step by step. Q: {question}")})
    client.set_pointer("prod", plain)
    client.set_pointer("prod", terse)

    experiments = Experiments(client)
    name = f"prompts-{share.settings.key_prefix[-6:]}"
    experiments.create(Experiment(name=name, unit_key="input.question", variants=[
        Variant(name="plain", resources_id=plain), Variant(name="terse", resources_id=terse)]))
    experiments.start(name)

    app = create_app(ServerConfig(password=PASSWORD), client=client)
    with serving(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD},
                                          viewport={"width": 1280, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # Snapshots: every candidate listed, and the diff of the two versions of one.
            page.goto(f"{url}/#/snapshots")
            expect(page.get_by_test_id("live")).to_have_text("live")
            for rid in ids.values():
                expect(page.locator(f"tr[data-id='{rid}']")).to_be_visible()
            shots(page, "snapshots")
            page.locator(f"tr[data-id='{plain}'] a").click()
            diff = page.get_by_test_id("diff")
            expect(diff.locator("ins")).to_have_text(re.compile(r"Think step by step\."))
            expect(diff.locator(".change")).to_have_attribute("data-path", "prompt.template")
            shots(page, "snapshot-diff")

            # Pointers: prod was moved plain -> terse; roll it back from the page, then move it again.
            page.goto(f"{url}/#/pointers")
            card = page.locator("[data-pointer='prod']")
            expect(card).to_have_attribute("data-target", terse)
            page.get_by_test_id("rollback-prod").click()
            expect(page.locator("[data-pointer='prod']")).to_have_attribute("data-target", plain)
            assert client.get_pointer("prod") == plain
            assert client.pointer_history("prod", 1)[0].by == "server:admin"
            shots(page, "pointer-rolled-back")
            page.get_by_test_id("move-target-prod").select_option(terse)
            # A registry change while the choice waits: the live reload redraws every card, and must
            # keep what the user picked (it put the list back to the old target, and Move sent that).
            client.set_pointer("staging", plain)
            expect(page.locator("[data-pointer='staging']")).to_be_visible()
            expect(page.get_by_test_id("move-target-prod")).to_have_value(terse)
            page.get_by_test_id("move-prod").click()
            expect(page.locator("[data-pointer='prod']")).to_have_attribute("data-target", terse)
            assert client.get_pointer("prod") == terse
            expect(page.get_by_test_id("timeline-prod").locator("li")).to_have_count(4)
            shots(page, "pointer-timeline")

            # An experiment: the charts follow the rollouts as they finish, without a reload.
            page.goto(f"{url}/#/experiments/{name}")
            chart = page.get_by_test_id("trajectory-chart")
            expect(chart).to_have_attribute("data-rewards", "0")
            finished = 0
            for batch in range(3):
                rollouts = experiments.enqueue(name, train)
                finished += len(rollouts)
                expect(page.get_by_test_id("trajectory-chart")).to_have_attribute("data-rewards", str(finished))
                expect(page.get_by_test_id("interval-chart")).to_have_attribute("data-finished", str(finished))
                shots(page, f"experiment-{batch + 1}")
            expect(page.get_by_test_id("sequential")).to_contain_text("always-valid p")
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # never reloaded

            # A rollout of it, from the explorer to its detail.
            page.goto(f"{url}/#/rollouts")
            page.get_by_test_id("filter-experiment").fill(name)
            page.get_by_test_id("filter-experiment").press("Enter")
            # The experiment's rollouts and only them (all on the first page of 50). The unfiltered list
            # shows a full page of 50 too, which an expected count of 50 passed on before the filter applied.
            rows = page.get_by_test_id("rollout-table").locator("tbody tr")
            expect(rows).to_have_count(finished)
            assert set(rows.evaluate_all("rows => rows.map((row) => row.dataset.id)")) == {
                r.rollout_id for r in client.query_rollouts(experiment=name, limit=100)}
            first = page.get_by_test_id("rollout-table").locator("tbody tr").first
            rollout_id = first.get_attribute("data-id")
            shots(page, "rollouts")
            first.locator("a").click()
            detail = page.get_by_test_id("rollout")
            expect(detail.locator("h1")).to_contain_text(str(rollout_id))
            attempt = client.get_attempts(str(rollout_id))[-1]
            expect(page.get_by_test_id("attempts")).to_contain_text(attempt.worker_id)
            expect(page.get_by_test_id("reward")).to_have_text(f"{client.get_rollout(str(rollout_id)).reward:.3f}")
            shots(page, "rollout-detail")

            deadline = time.monotonic() + 30
            while len(client.worker_health()) < len(share.workers):  # written by each worker's timer
                assert time.monotonic() < deadline, "the workers never recorded their health"
                time.sleep(0.2)
            page.goto(f"{url}/#/workers")
            for worker in share.workers:
                expect(page.locator(f"tr[data-worker='{worker.hostname}']")).to_be_visible()
            shots(page, "workers")
            assert not errors, errors
        finally:
            browser.close()
    if os.environ.get("LQ_UPDATE_SCREENSHOTS"):  # refresh the docs' copies only when asked: a test run leaves the tree as it was
        DOCS.mkdir(parents=True, exist_ok=True)
        for shot in ("snapshots", "snapshot-diff", "pointer-timeline", "experiment-3", "rollout-detail", "workers"):
            shutil.copy(shots.taken[shot], DOCS / f"{shot}.png")
