"""The ckptd daemon: one shared checkpoint cache per host, served to worker processes.

Built on the embedded engine (``ckptd.load``); its HTTP layer knows nothing of CUDA.
Settings come from :func:`load_settings` (flags > ``CKPTD_*`` variables > defaults) and
are passed explicitly; :class:`Server` binds the sockets and runs the app that
:func:`create_app` builds around the cache.

>>> import tempfile
>>> from ckptd.server import Server, load_settings
>>> root = tempfile.mkdtemp()
>>> settings = load_settings(roots=[root], shm_dir=root, socket="/tmp/ckdoc/d.sock")
>>> server = Server(settings, on_ready=lambda urls: None)  # server.serve() blocks until SIGTERM
"""

from ._app import create_app
from ._config import Settings, load_settings
from ._server import Server

__all__ = ["Server", "Settings", "create_app", "load_settings"]
