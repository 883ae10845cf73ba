"""Around the bits-back codec (vdm_jax/codec/coder.py): the bound it approaches, image files,
and the `--mode=compress` / `--mode=decompress` commands.

  python -m vdm_jax.main --config=configs/mnist.py --workdir=W --mode=compress \
      --input=images.npz --output=images.vdmc
  python -m vdm_jax.main --config=configs/mnist.py --workdir=W --mode=decompress \
      --input=images.vdmc --output=decoded.npz

Inputs and outputs may be local paths or gs:// paths (through etils.epath).
"""

import io
import math

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vdm_jax.codec import coder
from vdm_jax.codec import file_format
from vdm_jax.codec import tables
from vdm_jax.model import vdm
from vdm_jax.runtime import gcs


def discrete_bound(model, params, images, timesteps: int, *, batch_size: int = 64,
                   seed: int = 0, recon_draws: int = 8) -> np.ndarray:
  """Per-image −ELBO of the T-step model in bits, the quantity a file's net size
  approaches (§3, §9): L_prior + L_recon + Σ_{i=1..T} ½·expm1(γ_i − γ_{i−1})·‖ε − ε̂‖²,
  every one of the T terms drawn once per image (not T times one random term), and
  L_recon averaged over `recon_draws` draws of ε_0. γ(i/T) as in `compress`.
  """
  vocab = int(model.config.vocab_size)
  images = coder._check_images(images, vocab)
  n = len(images)
  gam = jnp.asarray(tables.gamma_grid(model, params, timesteps), jnp.float32)
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


# ------------------------------------------------------------------ image files
def load_images(path: str, split: str = 'test') -> np.ndarray:
  """uint8 [N, H, W, C] from a .npz (array `images`, else `split`) or a PNG folder."""
  source = epath.Path(path)
  if source.is_dir():
    names = sorted(p.name for p in source.iterdir() if p.name.lower().endswith('.png'))
    if not names:
      raise file_format.CodecError(f'{path} holds no .png files.')
    arrays = [np.asarray(Image.open(io.BytesIO((source / n).read_bytes()))) for n in names]
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    if len({a.shape for a in arrays}) > 1:
      raise file_format.CodecError(f'The PNG files in {path} differ in shape.')
    return np.stack(arrays).astype(np.uint8)
  if not path.endswith('.npz') or not source.is_file():
    raise file_format.CodecError(
        f'--input={path} is neither a .npz file nor a folder of PNG files.')
  with np.load(io.BytesIO(source.read_bytes()), allow_pickle=False) as npz:
    key = 'images' if 'images' in npz.files else split
    if key not in npz.files:
      raise file_format.CodecError(
          f'{path} has arrays {npz.files}; expected `images` or `{split}` '
          '(uint8 [N, H, W, C]).')
    images = npz[key]
  return images[..., None] if images.ndim == 3 else images


def save_images(images: np.ndarray, path: str) -> str:
  """To a .npz (array `images`) or, for any other path, a folder of PNG files."""
  target = epath.Path(path)
  if path.endswith('.npz'):
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    target.write_bytes(buffer.getvalue())
    return path
  target.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, 'PNG')
    (target / f'{i:06d}.png').write_bytes(buffer.getvalue())
  return path


# ------------------------------------------------------------------ commands
def restore(config, workdir: str):
  """(model, params) of the workdir's newest checkpoint, the parameters that
  evaluation uses (EMA unless config.eval.use_ema is False)."""
  from vdm_jax import build  # pylint: disable=g-import-not-at-top
  run, state = build.restore(config, workdir)
  return run.model, run.eval_params(state)


def codec_kwargs(config) -> dict:
  c = config.codec
  return dict(timesteps=c.timesteps, resolution=c.resolution,
              first_resolution=c.first_resolution, first_images=c.first_images,
              support=c.support)


def compress_command(config, workdir: str, input_path: str, output_path: str) -> str:
  """--mode=compress: IMAGES (.npz or PNG folder) to one file; returns a summary."""
  _check_access(input_path, output_path)
  images = load_images(input_path, config.eval.split)
  model, params = restore(config, workdir)
  data, report = coder.compress(model, params, images, batch_size=config.codec.batch_size,
                                first_group=config.codec.first_group,
                                **codec_kwargs(config))
  epath.Path(output_path).write_bytes(data)
  return f'{output_path}: {report.summary()}'


def decompress_command(config, workdir: str, input_path: str, output_path: str) -> str:
  """--mode=decompress: one file back to IMAGES (.npz, or a folder of PNG files)."""
  _check_access(input_path, output_path)
  data = epath.Path(input_path).read_bytes()
  model, params = restore(config, workdir)
  images = coder.decompress(model, params, data, **codec_kwargs(config))
  return f'{len(images)} images decoded to {save_images(images, output_path)}'


def _check_access(input_path: str, output_path: str) -> None:
  """Credentials and bucket of gs:// inputs and outputs, before anything runs."""
  for flag, path in (('--input', input_path), ('--output', output_path)):
    if gcs.is_gcs(path):
      gcs.check_access(path, flag)
