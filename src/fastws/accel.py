"""Which hot path runs: the compiled ``_fanout`` or its pure-Python twin ``_fanout_py``.

Every module that needs the fan-out or the state classes the chat path reads imports
``fanout`` from here, so the choice is made once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = ["FANOUT", "FANOUT_CHOSEN", "FANOUT_ERROR", "fanout"]

#: Which fan-out runs ("compiled" or "python"), and why not the compiled one ("" if it is).
#: FASTWS_FANOUT=python picks the pure-Python twin on purpose (to compare, or to debug).
FANOUT_ERROR = ""
#: The twin was asked for (a warning when a node starts), not fallen back to (an error).
FANOUT_CHOSEN = os.environ.get("FASTWS_FANOUT") == "python"
if TYPE_CHECKING:  # the twin keeps the same contract: type-check against the stubs
    from . import _fanout as fanout
elif FANOUT_CHOSEN:
    from . import _fanout_py as fanout

    FANOUT_ERROR = "chosen by FASTWS_FANOUT=python"
else:
    try:
        from . import _fanout as fanout
    except ImportError as exc:  # the extension was not built or does not load
        from . import _fanout_py as fanout

        FANOUT_ERROR = f"{type(exc).__name__}: {exc}"
FANOUT = "python" if FANOUT_ERROR else "compiled"
