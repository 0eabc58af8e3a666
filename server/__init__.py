"""The ckptd daemon: one shared checkpoint cache per host, served to worker processes.

Built on the engine (``ckptd.engine``), the device layer and the formats, through their
public names only; it never imports the front (``ckptd``'s API, client and command line),
and its HTTP layer knows nothing of CUDA. :func:`serve` is ``ckptd serve``'s command
(:func:`ready_line` the line it prints once listening). :class:`Settings` is the settings
model: :func:`load_settings` builds it (flags > ``CKPTD_*`` variables > defaults) and it is passed explicitly; :func:`add_arguments` makes
``ckptd serve``'s flags from it and :func:`flags_of` reads them back; :func:`settings_table`
is the README's table. :class:`Server` binds the sockets and runs the app that
:func:`create_app` builds around the cache; :func:`configure_logging` gives ckptd's and
uvicorn's records one format (text or JSON).

>>> import tempfile
>>> from ckptd.server import Server, load_settings
>>> root = tempfile.mkdtemp()
>>> settings = load_settings(roots=[root], shm_dir=root, socket="/tmp/ckdoc/d.sock")
>>> server = Server(settings, on_ready=lambda urls: None)  # server.serve() blocks until SIGTERM
"""

from ._app import create_app
from ._cli import ready_line, serve
from ._config import Settings, add_arguments, flags_of, load_settings, settings_table
from ._logging import configure_logging
from ._server import Server

__all__ = [
    "Server", "Settings", "add_arguments", "configure_logging", "create_app", "flags_of", "load_settings", "ready_line",
    "serve", "settings_table",
]
