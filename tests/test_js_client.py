"""The browser client, hisock_gevent/static/hisock.js: its Node tests, its fixtures, its packaging.

The JavaScript tests live in tests/js/ and run under Node's own test runner
(``node --test tests/js/``), against a fake WebSocket and byte vectors the Python library
made (tests/js/fixtures.json).  Here they are run as one test, the fixtures are made again
from the library and compared with the committed file, and the static files are checked to
be package data.

Node comes from Debian's ``nodejs`` package (``.ci/run`` installs it).  Without it the Node
test is skipped on a developer's machine and fails under CI, where it must run.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS_TESTS = ROOT / "tests" / "js"
STATIC = ROOT / "hisock_gevent" / "static"
NODE_TIMEOUT = 120

pytestmark = pytest.mark.timeout(NODE_TIMEOUT + 30)


def _load_fixture_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fixtures", JS_TESTS / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixtures_are_what_the_library_makes_now() -> None:
    maker = _load_fixture_maker()
    committed = (JS_TESTS / "fixtures.json").read_text(encoding="utf-8")
    assert maker.render() == committed, (
        "tests/js/fixtures.json no longer matches hisock_gevent: run `python tests/js/make_fixtures.py`, "
        "then `node --test tests/js/` to see what the JavaScript client must change"
    )


@pytest.mark.slow
def test_node_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("the JavaScript client's tests must run under CI, but node is missing")
        pytest.skip("needs Node.js (Debian's nodejs package) for tests/js/")
    test_files = sorted(str(path.relative_to(ROOT)) for path in JS_TESTS.glob("*.test.mjs"))
    assert test_files, "no tests/js/*.test.mjs"
    result = subprocess.run(
        [node, "--test", *test_files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        env={**os.environ, "NODE_OPTIONS": ""},
    )
    output = result.stdout + result.stderr
    failed = [line for line in output.splitlines() if re.match(r"\s*not ok ", line)]
    summary = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", output, re.MULTILINE))
    assert result.returncode == 0 and not failed, f"node --test failed:\n{output[-6000:]}"
    assert int(summary.get("pass", 0)) > 0 and summary.get("fail") == "0", output[-2000:]


def _package_data_patterns() -> List[str]:
    """The hisock_gevent patterns of [tool.setuptools.package-data] (no TOML parser before 3.11)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-data]", 1)[1]
    match = re.search(r"^hisock_gevent\s*=\s*\[(.*?)\]", section, re.MULTILINE | re.DOTALL)
    assert match, "no hisock_gevent entry in [tool.setuptools.package-data]"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_every_static_file_is_package_data() -> None:
    patterns = _package_data_patterns()
    files = [path.relative_to(STATIC.parent).as_posix() for path in STATIC.rglob("*") if path.is_file()]
    assert "static/hisock.js" in files and "static/msgpack/LICENSE" in files
    missing = [name for name in files if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    assert not missing, f"not in pyproject.toml's package-data, so not installed: {missing}"


def test_hisock_js_imports_only_files_that_exist() -> None:
    # The module is served as it is: every relative import must name a file beside it.
    for module in [STATIC / "hisock.js", *STATIC.glob("msgpack/**/*.mjs")]:
        for target in re.findall(r'^\s*(?:import|export)\b[^;]*?from\s+"(\.[^"]+)"', module.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL):
            assert (module.parent / target).is_file(), f"{module.relative_to(ROOT)} imports missing {target}"
