"""Keep freed host memory in the process, so that XLA:CPU's per-call buffers reuse it.

On CPU every dispatch of a compiled computation allocates its temporaries (one
buffer: 45 MiB for the MNIST default's train call) with malloc and frees them at the
end. glibc serves blocks above its mmap threshold (at most 32 MiB by default) with
fresh mmap pages and returns freed memory at the top of the heap to the kernel, so
every dispatch faults in tens of megabytes of zeroed pages again: ~11,500 page faults
per dispatch of the MNIST default. Raising the mmap and trim thresholds keeps those pages:
on the 2-core development machine this made the MNIST default's train step 1.2×
faster (BENCHMARKS.md). The cost is that the process keeps its peak heap, which a
training process does anyway.

Process-wide, so it is called by the entry points (vdm_jax/main.py and the
experiments' scripts), not by the library. A no-op where glibc's mallopt is absent.
"""

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Both thresholds at the largest value mallopt takes (an int, ~2 GiB): blocks below it
# come from the heap, and the heap's top goes back to the kernel only beyond it.
_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
  """Raises glibc's mmap and trim thresholds; True if both were set."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  set_ok = [mallopt(option, _THRESHOLD) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
  return all(set_ok)
