"""Shared helpers for the ckptd test suite, split by concern.

A plain package (not a conftest) so that pickle can find the classes some checkpoints hold
by their qualified name (``ckptd_testlib.checkpoints.TaggedTensor`` ...); ``tests/`` is on
``sys.path`` because ``tests/conftest.py`` lives there.

* :mod:`ckptd_testlib.checkpoints` -- the checkpoint corpus, save variants, pickle's classes.
* :mod:`ckptd_testlib.compare` -- ``assert_same`` and running torch.load beside ckptd.load.
* :mod:`ckptd_testlib.daemons` -- a real ``ckptd serve`` subprocess and ways to watch it.
* :mod:`ckptd_testlib.layout` -- a format reader's layout against the file and torch.load.
* :mod:`ckptd_testlib.fuzz` -- mutated checkpoints through torch.load and ckptd.load, judged.
* :mod:`ckptd_testlib.stalls` -- a ``write()`` stopped midway (userfaultfd), for readers that meet it.

Every name is re-exported here (``from ckptd_testlib import assert_same`` keeps working);
add a new helper to the module of its concern and list it in that module's ``__all__``.
"""

from __future__ import annotations

from .compare import *  # noqa: F403
from .compare import __all__ as _compare_all
from .checkpoints import *  # noqa: F403
from .checkpoints import __all__ as _checkpoints_all
from .daemons import *  # noqa: F403
from .daemons import __all__ as _daemons_all
from .layout import *  # noqa: F403
from .layout import __all__ as _layout_all
from .fuzz import *  # noqa: F403
from .fuzz import __all__ as _fuzz_all
from .stalls import *  # noqa: F403
from .stalls import __all__ as _stalls_all

__all__ = [*_compare_all, *_checkpoints_all, *_daemons_all, *_layout_all, *_fuzz_all, *_stalls_all]
