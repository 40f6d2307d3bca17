"""The examples run as users run them: as scripts, to completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        pytest.param("quickstart.py", [], "done: the backend shut down", id="quickstart-asyncio"),
        pytest.param(
            "quickstart.py", ["--trio"], "done: the backend shut down", id="quickstart-trio"
        ),
        pytest.param("trio_nursery.py", [], "resized ['a.png', 'b.png', 'c.png']", id="trio"),
        pytest.param("periodic.py", [], "every_second", id="periodic"),
    ],
)
@pytest.mark.parametrize("database", ["postgres", "memory"])
def test_example_runs(
    script: str, args: list[str], expected: str, database: str, request: pytest.FixtureRequest
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NEOQ_DSN"}
    if database == "postgres":
        env["NEOQ_DSN"] = request.getfixturevalue("dsn")
    elif script == "quickstart.py":
        pytest.skip("the quickstart's default is the embedded PostgreSQL, run by the README")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
