"""Lossless compression with a trained VDM: bits-back coding (docs/maths.md §9).

    from vdm_jax import codec
    data, report = codec.compress(model, params, images, timesteps=400)
    images = codec.decompress(model, params, data)

coder.py codes the latents and images on an ANS stack; tables.py quantises the
Gaussians it codes; file_format.py is the file's header and its checks; tools.py runs
the command-line modes, images.py reads and writes their image files and paths.py checks
and writes their --input and --output.
"""

from vdm_jax.codec.coder import compress
from vdm_jax.codec.coder import decompress
from vdm_jax.codec.coder import read_header
from vdm_jax.codec.file_format import CodecError
from vdm_jax.codec.file_format import CorruptFileError
from vdm_jax.codec.file_format import DecodeCheckError
from vdm_jax.codec.file_format import MismatchError

__all__ = ['compress', 'decompress', 'read_header', 'CodecError', 'CorruptFileError',
           'DecodeCheckError', 'MismatchError']
