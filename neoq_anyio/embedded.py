"""A throwaway PostgreSQL for examples, benchmarks and tests.

Needs the ``embedded`` extra (``pip install "neoq_anyio[embedded]"``), which
brings ``pgserver``: PostgreSQL binaries shipped in a wheel, so a machine with
nothing but pip can run neoq_anyio end to end.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["embedded_postgres"]


@contextmanager
def embedded_postgres(datadir: str | None = None) -> Iterator[str]:
    """Start a private PostgreSQL server for the block and yield its connection string.

    The connection string is a ``postgresql://`` URL for the server's
    ``postgres`` superuser and database, over a Unix socket in the data
    directory, ready for ``open_backend``. The server stops when the block
    ends.

    Args:
        datadir: where the cluster lives; default: a temporary directory,
            removed afterwards. An existing cluster there is reused.

    Raises:
        ModuleNotFoundError: the ``embedded`` extra is not installed.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers).
        warnings.simplefilter("ignore", UserWarning)
        import pgserver

    own_dir = datadir is None
    path = tempfile.mkdtemp(prefix="neoq-pg-") if datadir is None else datadir
    server = pgserver.get_server(path, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
