"""HiSock's ``constants`` module: the package's identity, where a ported program looks for it."""

from __future__ import annotations

__all__ = ["__version__", "__license__", "__copyright__", "__author__"]

#: The version of the HiSock API this package implements (and its own).
__version__ = "3.0.0"
__license__ = "MIT"
__copyright__ = "hisock_gevent's authors; the API is HiSock's (SSS-Says-Snek)"
__author__ = "hisock_gevent's authors"
