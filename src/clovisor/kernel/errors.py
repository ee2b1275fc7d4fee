"""The kernel layer's error root."""

from __future__ import annotations

import errno
import os


class KernelError(Exception):
    """A kernel or libbpf operation failed."""

    def __init__(self, what: str, err: int = 0) -> None:
        self.errno = abs(err)
        detail = f": {os.strerror(self.errno)} ({errno.errorcode.get(self.errno, self.errno)})"
        super().__init__(what + (detail if err else ""))


class NotSupported(KernelError):
    """This kernel or these privileges lack a feature Clovisor needs."""
