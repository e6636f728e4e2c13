"""One owner per sequence: once the engine admits it, only the thread that runs the
engine's step may change it. With SPECSHARD_OWNER_CHECK=1 (the test suite sets it) a
write from any other thread raises at once; otherwise the check costs nothing."""

from __future__ import annotations

import os
import threading
from typing import Any

CHECKED = os.environ.get("SPECSHARD_OWNER_CHECK") == "1"


class OwnerViolation(AssertionError):
    """State owned by the engine's step was written from another thread."""


class Owned:
    """A mixin for objects the engine owns once `claim`ed."""

    _owner: int | None = None

    def claim(self) -> None:
        """The calling thread (the engine's step) owns this object from now on."""
        object.__setattr__(self, "_owner", threading.get_ident())

    if CHECKED:
        def __setattr__(self, name: str, value: Any) -> None:
            owner = self._owner
            if owner is not None and owner != threading.get_ident():
                raise OwnerViolation(f"{type(self).__name__}.{name} written from thread "
                                     f"{threading.current_thread().name}, not its owner")
            object.__setattr__(self, name, value)
