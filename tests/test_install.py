"""A non-editable install (a built wheel in a fresh virtual environment) runs ``hisock-gevent chat``.

The wheel is built from a copy of the package outside the source tree (pip fetches the
build requirements, setuptools, as for any ``pip install .``) and installed without its
dependencies into a new virtual environment; the dependencies (gevent, msgpack, ...)
are borrowed from the environment running the tests through a ``.pth`` line.  The command then runs from a directory outside the
source tree, where nothing but the installed package can be found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from pathlib import Path
from typing import List

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
#: Seconds for each build or install step.
STEP_TIMEOUT = 120.0
WAIT = 15.0


def _build_wheel(tmp: Path) -> Path:
    """A wheel of the package, built from a copy of the tree (the checkout stays clean)."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hisock_gevent", source / "hisock_gevent", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    # Built the way `pip install .` builds it: in an isolated environment with the
    # build-system requirements of pyproject.toml.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(source)],
        check=True, timeout=STEP_TIMEOUT, capture_output=True,
    )
    (wheel,) = dist.glob("hisock_gevent-*.whl")
    return wheel


def _installed_env(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with ``wheel`` installed; returns its ``bin`` directory."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=STEP_TIMEOUT)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, timeout=STEP_TIMEOUT, capture_output=True, text=True,
        ).stdout.strip()
    )
    # The dependencies come from the environment running the tests.  Its own .pth files
    # (among them an editable install of this checkout) are not run from a path added this way.
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=STEP_TIMEOUT, capture_output=True,
    )
    return venv / "bin"


def test_the_wheel_carries_the_chat_server_and_no_examples(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_build_wheel(tmp_path)).namelist()

    assert "hisock_gevent/chat.py" in names
    assert "hisock_gevent/console.py" in names and "hisock_gevent/lines.py" in names
    assert not [name for name in names if name.startswith("examples/")]


def test_hisock_gevent_chat_runs_from_a_non_editable_install_outside_the_checkout(tmp_path: Path) -> None:
    bin_dir = _installed_env(tmp_path, _build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"

    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import hisock_gevent; print(hisock_gevent.__file__)"],
        cwd=elsewhere, env=env, check=True, timeout=WAIT, capture_output=True, text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where

    chat = subprocess.Popen(
        [str(bin_dir / "hisock-gevent"), "chat", "--port", "0"],
        cwd=elsewhere, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines: List[str] = []
        serving = threading.Event()
        port: List[int] = []

        def read_stderr() -> None:
            assert chat.stderr is not None
            for line in chat.stderr:
                lines.append(line)
                match = re.search(r"serving on [\d.]+:(\d+)", line)
                if match and not serving.is_set():
                    port.append(int(match.group(1)))
                    serving.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        assert serving.wait(WAIT), f"no 'serving on' line; stderr: {''.join(lines)}"

        who = subprocess.run(
            [str(bin_dir / "hisock-gevent"), "send", f"127.0.0.1:{port[0]}", "who", "--wait", "who", "--name", "visitor"],
            cwd=elsewhere, env=env, timeout=WAIT, capture_output=True, text=True,
        )
        assert who.returncode == 0, who.stderr
        assert json.loads(who.stdout) == {"room": "", "names": ["visitor"]}

        chat.terminate()
        assert chat.wait(timeout=WAIT) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait(timeout=WAIT)
