"""``python -m ckptd``: the ``ckptd`` command line (see :mod:`ckptd._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
