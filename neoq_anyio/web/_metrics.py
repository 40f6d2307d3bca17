"""``/metrics``: Prometheus's text format, when ``prometheus_client`` is installed.

Kept to one small function so the metrics can be rewired (to a registry of
neoq_anyio's own, say) without touching the rest of the dashboard.
"""

from __future__ import annotations

import importlib

from starlette.responses import PlainTextResponse, Response

__all__ = ["metrics_response"]


def metrics_response() -> Response:
    """The default registry's metrics; 404 without ``prometheus_client``."""
    try:
        client = importlib.import_module("prometheus_client")
    except ImportError:
        return PlainTextResponse(
            "no metrics: install prometheus_client (pip install 'neoq_anyio[prometheus]')\n",
            status_code=404,
        )
    body: bytes = client.generate_latest(client.REGISTRY)
    return Response(body, media_type=client.CONTENT_TYPE_LATEST)
