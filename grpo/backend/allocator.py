"""Host memory reuse for CPU training.

torch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold (at most 32 MB) with
fresh mmap calls and returns them to the kernel on free, so every large activation, logits or gradient
tensor of every micro-batch is first touched page by page: on the 135M model one update took ~2.5 M
minor page faults. Turning off mmap for large blocks and raising the trim threshold keeps freed memory in
the heap for the next tensor of that size. It changes where memory comes from, never what is computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from the heap and keep freed memory for reuse.

    Process-wide; returns False (and changes nothing) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
