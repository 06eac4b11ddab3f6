"""``python -m hisock_gevent``: the ``hisock-gevent`` command (see :mod:`hisock_gevent.cli`)."""

import sys

from .cli import main

sys.exit(main())
