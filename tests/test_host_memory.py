"""vdm_jax/runtime/host_memory.py: freed blocks stay in the process instead of faulting in again."""

import resource
import subprocess
import sys
import textwrap

import pytest

# Allocates, touches and frees a 64 MiB block five times; prints the minor page faults.
_PROGRAM = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    from vdm_jax.runtime import host_memory
    if sys.argv[1] == 'keep':
      assert host_memory.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(p)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
_PAGES = (64 << 20) // resource.getpagesize()  # faults to touch one block once


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, '-c', _PROGRAM, mode], capture_output=True,
                       text=True, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_blocks_are_reused_without_page_faults():
  # glibc's defaults: each of the five blocks is a fresh mapping, faulted in again.
  assert _faults('default') > 4 * _PAGES
  # Kept: the block is faulted in once and then reused.
  assert _faults('keep') < 1.5 * _PAGES
