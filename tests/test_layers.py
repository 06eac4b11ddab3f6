"""The package's layers (README, "How it is built"): a module imports only from its own
layer or the ones below it, and the bytes layer imports no gevent at all.

Read from the source with ``ast``, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hisock_gevent"

#: Module -> layer: 1 bytes, 2 one connection, 3 server and client pieces, 4 the faces.
LAYERS: Dict[str, int] = {
    # 1: no sockets, no gevent
    "errors": 1, "utils": 1, "constants": 1, "frames": 1, "messages": 1, "typecast": 1, "protocol": 1,
    "outgoing": 1, "stats": 1, "budget": 1, "tls": 1, "history": 1, "lines": 1,
    "cluster_messages": 1, "cluster_mirror": 1, "cluster_sync": 1, "websocket": 1,
    # 2: one peer on gevent
    "connection": 2, "ws_connection": 2, "plainwriter": 2, "home": 2, "handlers": 2, "registry": 2, "inbox": 2,
    "calls": 2, "dial": 2,
    # 3: what servers and clients are made of
    "config": 3, "admission": 3, "membership": 3, "session": 3, "client_link": 3,
    "reconnect": 3, "ws_session": 3, "ws_gate": 3, "cluster": 3, "redis_store": 3, "redis_bus": 3, "backplane": 3,
    # 4: the faces
    "server": 4, "client": 4, "monitor": 4, "workers": 4, "chat": 4, "console": 4, "cli": 4,
    "locust": 4, "__init__": 4, "__main__": 4,
}
#: The modules the issue names: pure protocol, tested with bytes alone.
NO_GEVENT = {name for name, layer in LAYERS.items() if layer == 1}


def imports_of(module: str) -> Set[str]:
    """The package modules ``module`` imports (relative imports), and ``"gevent"`` if it
    imports gevent or greenlet."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] in ("gevent", "greenlet"):
                found.add("gevent")
        elif isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] in ("gevent", "greenlet") for alias in node.names):
                found.add("gevent")
    return found - {"__version__"}


def test_every_module_of_the_package_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set(LAYERS), f"give these a layer: {sorted(modules - set(LAYERS))}; gone: {sorted(set(LAYERS) - modules)}"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_a_module_imports_nothing_from_a_layer_above_its_own(module):
    above = {name for name in imports_of(module) - {"gevent"} if LAYERS[name] > LAYERS[module]}
    assert not above, f"{module} (layer {LAYERS[module]}) imports {sorted(above)} from above"


@pytest.mark.parametrize("module", sorted(NO_GEVENT))
def test_the_bytes_layer_imports_no_gevent(module):
    assert "gevent" not in imports_of(module)
