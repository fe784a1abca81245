"""`cudaMemcpy2DAsync` through ctypes, on the CUDA runtime torch itself loaded.

torch exposes no 2-D memcpy; one call moves `height` rows of `width` bytes between two
pitched buffers on the copy engines, which is exactly one run of KV pages (page_copy.py).
The runtime is the `libcudart` already mapped into this process (torch's own), else the one
the loader or the nvidia wheels provide. Any failure (no runtime, a non-zero return code)
is logged once and turns the fast path off for the life of the process: callers then take
the torch path, which is always correct.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import site
from typing import Optional

log = logging.getLogger("pdcluster.kv_transfer")

MEMCPY_DEFAULT = 4          # cudaMemcpyDefault: direction from the (UVA) pointers, peers included

_runtime: Optional[ctypes.CDLL] = None
_disabled = False


def _loaded_cudart() -> Optional[str]:
    """Path of a libcudart already mapped into this process (torch's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if "libcudart" in os.path.basename(path) and path.startswith("/"):
                    return path
    except OSError:
        pass
    return None


def _wheel_cudarts() -> list[str]:
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcudart.so*")))


def _open_runtime() -> ctypes.CDLL:
    candidates = [p for p in [_loaded_cudart()] if p] + ["libcudart.so"] + _wheel_cudarts()
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(str(e))
            continue
        lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpy2DAsync.restype = ctypes.c_int
        lib.cudaGetLastError.argtypes = []
        lib.cudaGetLastError.restype = ctypes.c_int
        return lib
    raise OSError("no CUDA runtime (libcudart) found: " + "; ".join(errors))


def runtime() -> Optional[ctypes.CDLL]:
    """The cached runtime handle, or None once the fast path is off."""
    global _runtime
    if _disabled:
        return None
    if _runtime is None:
        try:
            _runtime = _open_runtime()
        except (OSError, AttributeError) as e:
            disable(f"cannot load the CUDA runtime: {e}")
            return None
    return _runtime


def disable(reason: str) -> None:
    global _disabled
    if not _disabled:
        log.warning("2-D page copies off, the torch copy path takes over: %s", reason)
    _disabled = True


def memcpy_2d(copies, src_ptr: int, dst_ptr: int, stream: int) -> bool:
    """Enqueue `copies` (`Copy2D`s, offsets from the two base pointers) on `stream`.
    False when the fast path is (or has just been turned) off: the caller copies again
    with torch; copies already enqueued are identical, so redoing them is harmless."""
    lib = runtime()
    if lib is None:
        return False
    for c in copies:
        rc = lib.cudaMemcpy2DAsync(dst_ptr + c.dst_offset, c.dst_pitch, src_ptr + c.src_offset, c.src_pitch,
                                   c.width, c.height, MEMCPY_DEFAULT, stream)
        if rc != 0:
            # NOTE: clear the runtime's last error, or torch's next launch check reports it
            lib.cudaGetLastError()
            disable(f"cudaMemcpy2DAsync returned {rc}")
            return False
    return True
