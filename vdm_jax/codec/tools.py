"""Around the codec (vdm_jax/codec/compressor.py): the bound it approaches and the
`--mode=compress` / `--mode=decompress` commands (image files: images.py; their paths:
paths.py).

  python -m vdm_jax.main --config=configs/mnist.py --workdir=W --mode=compress \
      --input=images.npz --output=images.vdmc
  python -m vdm_jax.main --config=configs/mnist.py --workdir=W --mode=decompress \
      --input=images.vdmc --output=decoded.npz
"""

import math

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.codec import compressor
from vdm_jax.codec import file_format
from vdm_jax.codec import images as images_lib
from vdm_jax.codec import paths
from vdm_jax.codec import tables
from vdm_jax.model import vdm


def discrete_bound(model, params, images, timesteps: int, *, batch_size: int = 64,
                   seed: int = 0, recon_draws: int = 8, gamma=None) -> np.ndarray:
  """Per-image −ELBO of the T-step model in bits, the quantity a file's net size
  approaches (§3, §9): L_prior + L_recon + Σ_{i=1..T} ½·expm1(γ_i − γ_{i−1})·‖ε − ε̂‖²,
  every one of the T terms drawn once per image (not T times one random term), and
  L_recon averaged over `recon_draws` draws of ε_0. γ_i = γ(i/T) as in `compress`, or
  the T + 1 levels `gamma` given (steps placed for rate, §9.1).
  """
  vocab = int(model.config.vocab_size)
  images = compressor.check_images(images, vocab)
  n = len(images)
  if gamma is None:
    gamma = tables.gamma_grid(model, params, timesteps)
  gam = jnp.asarray(gamma, jnp.float32)
  batch = min(batch_size, n)
  nats = np.zeros(n)

  @jax.jit
  def diffusion_term(params, x, i, key):
    f = vdm.encode(x, vocab)
    eps = jax.random.normal(key, f.shape)
    z = jnp.sqrt(nn.sigmoid(-gam[i])) * f + jnp.sqrt(nn.sigmoid(gam[i])) * eps
    g = jnp.full((x.shape[0],), gam[i])
    eps_hat = model.apply({'params': params}, z, g, jnp.zeros_like(g),
                          method=vdm.VDM.score)
    return vdm.diffusion_loss_discrete(gam[i], gam[i - 1], timesteps, eps, eps_hat) / timesteps

  @jax.jit
  def end_terms(x, key):
    f = vdm.encode(x, vocab)
    eps_0 = jax.random.normal(key, (recon_draws,) + f.shape)
    recon = jax.vmap(lambda e: vdm.reconstruction_loss(x, f, e, gam[0], vocab))(eps_0)
    return vdm.prior_loss(f, gam[timesteps]) + recon.mean(axis=0)

  key = jax.random.key(seed)
  for start in range(0, n, batch):
    x = np.zeros((batch,) + images.shape[1:], np.int32)
    m = min(batch, n - start)
    x[:m] = images[start:start + m]
    k = jax.random.fold_in(key, start)
    total = np.asarray(end_terms(x, jax.random.fold_in(k, 0)), np.float64)
    for i in range(1, timesteps + 1):
      total += np.asarray(diffusion_term(params, x, i, jax.random.fold_in(k, i)))
    nats[start:start + m] = total[:m]
  return nats / math.log(2.0)


# ------------------------------------------------------------------ commands
def _restored(config, workdir: str):
  """(run, params, step) of the workdir's newest checkpoint, with the parameters that
  evaluation uses (EMA unless config.eval.use_ema is False)."""
  from vdm_jax import build  # pylint: disable=g-import-not-at-top
  run, state = build.restore(config, workdir)
  return run, run.eval_params(state), int(state.step)


def restore(config, workdir: str):
  """(model, params, step) of the workdir's newest checkpoint (see _restored)."""
  run, params, step = _restored(config, workdir)
  return run.model, params, step


def _named(input_path: str, error: file_format.CodecError) -> file_format.CodecError:
  return type(error)(f'--input={input_path}: {error}')


def fit_images(images: np.ndarray, run, input_path: str) -> np.ndarray:
  """The images, if the restored model can code them; else a CodecError saying why.

  Another height or width than the training images' is coded (the network is
  convolutional, the round trip stays exact) with a warning: the model never saw it.
  """
  h, w, c = run.image_shape
  where = f'--input={input_path}'
  try:
    images = compressor.check_images(images, run.config.model.vocab_size)
  except file_format.CodecError as e:
    raise _named(input_path, e) from e
  if images.shape[-1] != c:
    raise file_format.CodecError(
        f'{where}: the images have {images.shape[-1]} channel(s), the model codes {c} '
        f'(it was trained on {run.info.name}, {h}x{w}x{c}). Convert them to '
        f'{images_lib.KINDS.get(c, f"{c} channels")} (PNG mode '
        f'{images_lib.PNG_MODES.get(c, "none")}).')
  levels = 2**(len(run.config.model.channel_mult) - 1)
  if images.shape[1] % levels or images.shape[2] % levels:
    raise file_format.CodecError(
        f'{where}: the images are {images.shape[1]}x{images.shape[2]}; the model halves '
        f'them {levels.bit_length() - 1} time(s), so H and W must divide by {levels}.')
  if images.shape[1:3] != (h, w):
    logging.warning('%s: the images are %dx%d, but the model was trained on %dx%d '
                    '(%s) and has never seen that size: the round trip is exact, the file '
                    'may be larger than at the training size.', where, images.shape[1],
                    images.shape[2], h, w, run.info.name)
  return images


def codec_kwargs(config) -> dict:
  c = config.codec
  return dict(timesteps=c.timesteps, resolution=c.resolution,
              first_resolution=c.first_resolution, first_images=c.first_images,
              support=c.support)


def compress_command(config, workdir: str, input_path: str, output_path: str,
                     overwrite: bool = False) -> str:
  """--mode=compress: IMAGES (.npz or PNG folder) to one file; returns a summary.

  Every fault of --input, --output or the images is reported before the compression
  starts; the file appears only once complete, and replaces one only with `overwrite`.
  """
  output = paths.Output(output_path, folder=False, overwrite=overwrite,
                        example='images.vdmc')
  paths.check(input_path, output, images=True)
  with output.writing() as tmp:
    with paths.local_input(input_path) as local:
      images = images_lib.load_images(local, config.eval.split, shown=input_path)
    run, params, step = _restored(config, workdir)
    images = fit_images(images, run, input_path)
    data, report = compressor.compress(
        run.model, params, images, batch_size=config.codec.batch_size,
        first_group=config.codec.first_group, step=step, progress=True,
        step_placement=config.codec.step_placement, **codec_kwargs(config))
    with open(tmp, 'wb') as f:
      f.write(data)
  return f'{output_path}: {report.summary()}'


def decompress_command(config, workdir: str, input_path: str, output_path: str,
                       overwrite: bool = False) -> str:
  """--mode=decompress: one file back to IMAGES (.npz, or a folder of PNG files)."""
  output = paths.Output(output_path, folder=not output_path.endswith('.npz'),
                        overwrite=overwrite, example='decoded.npz')
  paths.check(input_path, output, images=False)
  with output.writing() as tmp:
    data = epath.Path(input_path).read_bytes()
    try:
      header = compressor.read_header(data)
    except file_format.CodecError as e:
      raise _named(input_path, e) from e
    if output.folder and (header.vocab_size > 256 or header.image_shape[-1] > 4):
      raise file_format.CodecError(
          f'--input={input_path} holds images of {header.image_shape[-1]} channel(s) with '
          f'{header.vocab_size} values, more than PNG files hold; give a .npz --output.')
    model, params, step = restore(config, workdir)
    try:
      images = compressor.decompress(model, params, data, step=step, progress=True,
                                     **codec_kwargs(config))
    except file_format.CodecError as e:
      raise _named(input_path, e) from e
    (images_lib.save_pngs if output.folder else images_lib.save_npz)(images, tmp)
  return f'{len(images)} images decoded to {output_path}'

