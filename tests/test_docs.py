"""Every Python sample in the documentation runs, so the docs cannot rot.

The samples are the fenced ``python`` blocks of ``docs/**/*.md``. The
comment on the line before a block's fence says how it runs:

* no comment: the block is a complete module. It is executed with
  ``__name__ == "docs_sample"``, so an ``if __name__ == "__main__":`` block,
  where a sample starts its event loop, is skipped; then its ``async def
  main()`` and any ``async def test_*()`` taking no arguments are awaited on
  asyncio and on trio, bounded by ``fail_after``. A block that imports
  ``trio`` runs on trio only, one that imports ``asyncio`` on asyncio only.
  A module-level ``DSN = "postgresql://..."`` is re-pointed at the test
  database (the ``dsn`` fixture: a fresh schema) before ``main()`` runs, so
  samples read ``DSN`` inside functions only. Without ``DSN`` a sample uses
  the in-memory backend (``open_backend()``).
* ``<!-- run: script -->``: the block runs once as ``__main__`` and starts
  its own event loop (for ``trio.run(main, clock=MockClock(...))``). It may
  not use ``DSN``.
* ``<!-- run: pytest -->``: the block is a test file; pytest runs it in a
  subprocess (all such blocks in one run). It may not use ``DSN``.
* ``<!-- not-run -->``: a fragment, only compiled (top-level ``await``
  allowed), and its ``neoq_anyio`` imports checked. Keep these few.

The ``sql`` blocks run too, on a fresh schema neoq_anyio set up, unless
marked ``<!-- not-run -->`` (a test of their own covers those).

Samples finish by themselves: they wait on events or ``drain()``, never on
``sleep_forever()``. README.md's Python blocks are fragments: they are
compiled and their imports checked.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import anyio
import pytest

import neoq_anyio
from neoq_anyio import open_backend

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<mode>not-run|run: script|run: pytest)\s*-->\s*$")
_ANY_MARKER = re.compile(r"^\s*<!--\s*(not-run|run\b)")
_MODES = {"not-run": "fragment", "run: script": "script", "run: pytest": "pytest"}
_LOOPS = ("asyncio", "trio")
_TIMEOUT = 30.0  # seconds a sample may take, on either loop


@dataclass(frozen=True)
class Sample:
    """One fenced ``python`` or ``sql`` block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the block's first code line
    code: str
    mode: str  # "module", "script", "pytest", "fragment" or "sql"

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def uses_dsn(self) -> bool:
        return re.search(r"^DSN\s*[:=]", self.code, re.MULTILINE) is not None

    def compile(self, *, flags: int = 0) -> types.CodeType:
        # Pad with blank lines so tracebacks point at the Markdown file's lines.
        source = "\n" * (self.line - 1) + self.code
        code: types.CodeType = compile(source, str(self.path), "exec", flags=flags)
        return code

    def loops(self) -> tuple[str, ...]:
        imported = _imported_modules(ast.parse(self.code))
        wanted = tuple(loop for loop in _LOOPS if loop in imported)
        assert len(wanted) < 2, f"{self.name} imports both asyncio and trio"
        return wanted or _LOOPS


def _imported_modules(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def extract(path: Path, *, default_mode: str = "module") -> list[Sample]:
    """The ``python`` and ``sql`` blocks of a Markdown file, with their run mode."""
    lines = path.read_text(encoding="utf-8").splitlines()
    samples: list[Sample] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, info = opening["indent"], opening["info"].strip()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{path}:{i + 1}: unclosed code fence"
        language = info.split()[0] if info else ""
        body = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end]) + "\n"
        if language == "sql":
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            # A not-run sql block (say, grants to a role of the reader's) is
            # checked by the test that covers it instead.
            if not _MARKER.match(previous):
                samples.append(Sample(path, i + 2, body, "sql"))
        elif language.startswith("py"):
            assert language == "python", (
                f"{path}:{i + 1}: write ```python so the sample is found and run"
            )
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _MARKER.match(previous)
            assert marker or not _ANY_MARKER.match(previous), (
                f"{path}:{i + 1}: unknown sample marker {previous.strip()!r}"
            )
            samples.append(
                Sample(path, i + 2, body, _MODES[marker["mode"]] if marker else default_mode)
            )
        i = end + 1
    return samples


def _doc_samples() -> list[Sample]:
    return [sample for path in sorted(DOCS.rglob("*.md")) for sample in extract(path)]


SAMPLES = _doc_samples()
README_SAMPLES = extract(README, default_mode="fragment")


def _module_params() -> list[Any]:
    return [
        pytest.param(sample, (loop, {}), id=f"{sample.name}-{loop}")
        for sample in SAMPLES
        if sample.mode == "module"
        for loop in sample.loops()
    ]


def _params(mode: str, samples: list[Sample] = SAMPLES) -> list[Any]:
    return [pytest.param(s, id=s.name) for s in samples if s.mode == mode]


@contextlib.contextmanager
def _executed(sample: Sample, name: str) -> Iterator[dict[str, Any]]:
    """Execute a sample as module ``name``, registered in ``sys.modules`` for the
    block (dataclasses and pickling look their module up there)."""
    module = types.ModuleType(name)
    module.__file__ = str(sample.path)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        exec(sample.compile(), module.__dict__)
        yield module.__dict__
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


def _entry_points(namespace: dict[str, Any]) -> list[Any]:
    names = [name for name in namespace if name == "main" or name.startswith("test_")]
    entries = [namespace[name] for name in names]
    for name, entry in zip(names, entries, strict=True):
        assert inspect.iscoroutinefunction(entry), f"{name} must be an async function"
        assert not inspect.signature(entry).parameters, f"{name} must take no arguments"
    return entries


@pytest.fixture
def sample_dsn(sample: Sample, request: pytest.FixtureRequest) -> str | None:
    """The test database for samples that define ``DSN``; set up before the loop runs."""
    return str(request.getfixturevalue("dsn")) if sample.uses_dsn else None


def test_docs_have_samples() -> None:
    assert len(SAMPLES) >= 20
    fragments = [s.name for s in SAMPLES if s.mode == "fragment"]
    assert len(fragments) <= len(SAMPLES) // 4, f"too many not-run samples: {fragments}"


@pytest.mark.parametrize(("sample", "anyio_backend"), _module_params())
async def test_sample_runs(sample: Sample, sample_dsn: str | None) -> None:
    with _executed(sample, "docs_sample") as namespace:
        if sample_dsn is not None:
            namespace["DSN"] = sample_dsn
        entries = _entry_points(namespace)
        with anyio.fail_after(_TIMEOUT):
            for entry in entries:
                await entry()


@pytest.mark.parametrize("sample", _params("script"))
def test_script_sample_runs(sample: Sample) -> None:
    assert not sample.uses_dsn, f"{sample.name}: script samples run without a database"
    assert "__main__" in sample.code, f"{sample.name}: a script sample starts its own loop"
    with _executed(sample, "__main__"):
        pass


def test_pytest_samples_pass(tmp_path: Path) -> None:
    """All ``run: pytest`` samples, one file each, in a single pytest run."""
    files: dict[str, Sample] = {}
    for sample in (s for s in SAMPLES if s.mode == "pytest"):
        assert not sample.uses_dsn, f"{sample.name}: pytest samples run without DSN"
        stem = re.sub(r"\W", "_", f"test_{sample.path.stem}_{sample.line}")
        (tmp_path / f"{stem}.py").write_text(sample.code, encoding="utf-8")
        files[stem] = sample
    report = tmp_path / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    ran = {case.get("classname", "") for case in ElementTree.parse(report).iter("testcase")}
    for stem, sample in files.items():
        assert stem in ran, f"{sample.name}: no test ran"


@pytest.mark.parametrize("sample", [*_params("fragment"), *_params("fragment", README_SAMPLES)])
def test_fragment_compiles(sample: Sample) -> None:
    code = sample.compile(flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert code is not None
    for node in ast.walk(ast.parse(sample.code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neoq_anyio"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{sample.name}: no {node.module}.{alias.name}"


@pytest.mark.parametrize(
    ("sample", "anyio_backend"),
    [pytest.param(s, ("asyncio", {}), id=s.name) for s in SAMPLES if s.mode == "sql"],
)
async def test_sql_sample_runs(sample: Sample, dsn: str) -> None:
    async with open_backend(dsn) as nq, nq.connection() as conn:
        await conn.execute(sample.code.encode())


def test_reference_covers_the_public_api() -> None:
    reference = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (neoq_anyio[\w.]*)\s*$", reference, re.MULTILINE))
    expected = {f"neoq_anyio.{name}" for name in neoq_anyio.__all__}
    expected |= {"neoq_anyio.testing", "neoq_anyio.embedded", "neoq_anyio.web.create_app"}
    assert sorted(expected - documented) == []
    assert sorted(documented - expected) == []


def test_landing_page_shows_the_readme_commands() -> None:
    # The README opens with the two commands that work on a fresh machine.
    commands = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert len(commands) >= 2
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for command in commands[:2]:
        assert command in index
