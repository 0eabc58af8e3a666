"""``ckptd serve``: the daemon's command. The ``ckptd`` command line parses it with
:func:`ckptd.server.add_arguments` (one flag per setting) and hands it to :func:`serve`.

``ckptd serve`` prints ``ckptd: serving on unix:///path/to.sock`` (followed by
`` and http://host:port`` when TCP is on) to stdout once its sockets listen, then runs
until SIGTERM or SIGINT and exits 0 after a clean shutdown.

>>> ready_line(["unix:///tmp/ck/ckptd.sock"])
'ckptd: serving on unix:///tmp/ck/ckptd.sock'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import suppress
from typing import TextIO

from ._config import flags_of, load_settings
from ._logging import configure_logging
from ._server import Server


def ready_line(urls: Sequence[str]) -> str:
    """The line ``ckptd serve`` prints once it listens.

    >>> ready_line(["unix:///tmp/ck/ckptd.sock", "http://127.0.0.1:8750"])
    'ckptd: serving on unix:///tmp/ck/ckptd.sock and http://127.0.0.1:8750'
    """
    return "ckptd: serving on " + " and ".join(urls)


def serve(args: argparse.Namespace, out: TextIO) -> int:
    """``ckptd serve --socket PATH --root DIR ...``: run the daemon until SIGTERM/SIGINT,
    then end the process (exit status 0); ``args`` as parsed with :func:`add_arguments`.

    >>> from ckptd.server import add_arguments
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> args = parser.parse_args(["--socket", "/tmp/ckdoc/d.sock", "--root", "/tmp"])
    >>> args.socket, args.roots  # serve(args, sys.stdout) prints ready_line(...) and blocks until SIGTERM
    ('/tmp/ckdoc/d.sock', ['/tmp'])
    """
    settings = load_settings(**flags_of(args))
    configure_logging(settings.log_level, settings.log_format)

    def announce(urls: list[str]) -> None:
        print(ready_line(urls), file=out, flush=True)

    Server(settings, on_ready=announce).serve()
    _exit_now(0)
    return 0  # not reached


def _exit_now(status: int) -> None:
    """End the daemon's process without tearing down its modules.

    By now every arena is freed and the socket removed; what is left is the interpreter's
    own teardown of torch and the server stack, which costs seconds on a busy host, while
    an orchestrator expects a SIGTERMed daemon gone at once. Logs and output are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
