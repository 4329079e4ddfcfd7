"""``lightning-queue server``: a versioned JSON API (``/api/v1``, OpenAPI at ``/api/v1/openapi.json``),
a server-sent-events stream of changes, and the dashboard page, served by one ASGI app.

* :mod:`.config` the server's settings (``LQ_SERVER_*``) and who may do what;
* :mod:`.auth` credentials (basic or bearer) and the cross-site check on changes;
* :mod:`.snapshots`, :mod:`.rollouts`, :mod:`.experiments`, :mod:`.workers` the API's routers;
* :mod:`.events` the change stream, driven by Redis pub/sub;
* :mod:`.diff` what changed between two snapshot versions;
* :mod:`.app` :func:`create_app`, which puts them together with the page under ``static/``.

Everything is read through the client and the storage layer; experiments are reported from the
aggregates kept as their rollouts finish (:meth:`~lightning_queue.experiments.Experiments.live_report`).
"""

from lightning_queue.ops.server.app import create_app
from lightning_queue.ops.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
