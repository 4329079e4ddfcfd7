"""The package's shape as a contract: layers, independence of the two sides, no leaks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from celery import signals

from lightning_queue import LightningClient, Settings, create_app

ROOT = Path(__file__).resolve().parents[2]

WORKER_SIGNALS = (
    signals.worker_init, signals.worker_process_init, signals.worker_process_shutdown, signals.worker_shutdown,
    signals.task_received,
)


def receivers() -> dict[str, int]:
    return {s.name: len(s.receivers) for s in WORKER_SIGNALS}


def test_the_import_contracts_hold() -> None:
    """``core <- storage <- broker <- {client, worker} <- experiments <- ops``, no cycles, and
    the client and worker sides never import each other (pyproject.toml's import-linter contracts)."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_import_graph_has_no_cycle() -> None:
    """Every import counts, including those under TYPE_CHECKING and inside functions."""
    import grimp

    graph = grimp.build_graph("lightning_queue", cache_dir=None)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


def test_many_clients_and_apps_leave_one_set_of_signal_receivers(prefix: str) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", key_prefix=prefix)
    create_app(settings)  # the worker side's receivers, connected once at import
    before = receivers()
    for _ in range(50):
        client = LightningClient(settings, redis_client=_NoRedis())  # type: ignore[arg-type]
        assert client.publisher.queue_for(None) == settings.queue  # builds the client's Celery app
        client.close()
        create_app(settings)
    assert receivers() == before


def test_a_client_never_loads_the_worker_side() -> None:
    code = ("import sys; from lightning_queue import LightningClient, AsyncLightningClient, Settings, RolloutRequest; "
            "import fakeredis; c = LightningClient(Settings(redis_url='redis://127.0.0.1:1/0'), redis_client=fakeredis.FakeRedis()); c.publisher.queue_for(None); "
            "print(sorted(m for m in sys.modules if m.startswith('lightning_queue.worker')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_worker_never_loads_the_client_side() -> None:
    code = ("import sys; import lightning_queue.app as a; a.app; "
            "print(sorted(m for m in sys.modules if m in ('lightning_queue.client', 'lightning_queue.aio') "
            "or m.startswith(('lightning_queue.experiments', 'lightning_queue.ops'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("heavy", ["scipy", "matplotlib", "flower", "fakeredis", "prometheus_client"])
def test_a_worker_does_not_import_optional_dependencies(heavy: str) -> None:
    code = f"import sys; import lightning_queue.app as a; a.app; print({heavy!r} in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_plain_install_brings_no_optional_dependency() -> None:
    from importlib.metadata import requires

    plain = [r for r in requires("lightning-queue") or [] if "extra ==" not in r]
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in plain}
    assert names.isdisjoint({"scipy", "numpy", "matplotlib", "flower", "prometheus-client", "fakeredis"}), names


class _NoRedis:
    """Stands in for a Redis client: nothing here talks to Redis."""

    def close(self) -> None:
        pass

    def register_script(self, source: str) -> object:
        return object()
