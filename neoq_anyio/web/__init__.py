"""The dashboard: ``create_app(nq)`` gives an ASGI application (Starlette).

Needs the ``web`` extra (``pip install 'neoq_anyio[web]'``); ``neoq-anyio
dashboard`` serves it with Hypercorn on asyncio or trio. See the
Observability page of the documentation for exposing it safely.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("starlette") is None:  # pragma: no cover - checked in a subprocess
    raise ImportError(
        "neoq_anyio.web needs the web extra: pip install 'neoq_anyio[web]'", name="starlette"
    )

from ._app import create_app as create_app

__all__ = ("create_app",)

create_app.__module__ = __name__
