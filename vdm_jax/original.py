r"""Import of the original code's checkpoints (docs/maths.md §6, §8).

The original code (github.com/google-research/vdm) saves with clu into a folder
`checkpoints-0/` that holds `ckpt-N.flax`: msgpack (flax.serialization.to_bytes) of its
TrainState, a dict {step, params, ema_params, opt_state}. Its VDM has the submodules
`gamma` (`w`, `b` or `l1`/`l2`/`l3`, §2) and `score_model` (names of §6), and its
encoder/decoder has no parameters, so its parameter tree is ours: an import maps trees
and checks every name and shape.

  python -m vdm_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10_orig \
      --mode=import_original --original_checkpoint=PATH/checkpoint-final/checkpoints-0
  python -m vdm_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10_orig \
      --mode=eval

The released models: configs/cifar10.py (no augmentation, README 2.637 bpd) and
configs/cifar10_aug.py (with augmentation, 2.522 bpd).
"""

import os
import re
from typing import Any, Optional

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import build as build_lib
from vdm_jax import errors
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock
from vdm_jax.training import train_state

REQUIRED_KEYS = ('step', 'params', 'ema_params')
_CKPT_FILE = re.compile(r'^ckpt-(\d+)\.flax$')
_HOST_FOLDER = re.compile(r'^checkpoints-(\d+)$')


class OriginalCheckpointError(errors.InputError, ValueError):
  """The file is not a readable checkpoint of the original code."""


# ------------------------------------------------------------------ reading
def _ckpt_files(folder: epath.Path) -> dict:
  """{N: path} of the ckpt-N.flax files directly in `folder`."""
  found = {}
  for child in folder.iterdir():
    m = _CKPT_FILE.match(child.name)
    if m and not child.is_dir():
      found[int(m.group(1))] = child
  return found


def find_checkpoint_file(path) -> str:
  """The ckpt-N.flax to read: `path` itself, or the largest N in the folder `path`.

  A folder without ckpt files but with `checkpoints-0/` (the original's layout above
  it, e.g. `checkpoint-final/`) is looked into. gs:// paths work where etils can read
  them.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'Original checkpoint {path} does not exist; pass the '
                            "original code's checkpoints-0/ folder or a ckpt-N.flax in it.")
  if not p.is_dir():
    return os.fspath(p)
  found = _ckpt_files(p)
  if not found:
    hosts = {}
    for child in p.iterdir():
      m = _HOST_FOLDER.match(child.name)
      if m and child.is_dir():
        hosts[int(m.group(1))] = child
    if hosts:  # checkpoints-0 is process 0's; the others hold the same state.
      p = hosts[min(hosts)]
      found = _ckpt_files(p)
  if not found:
    raise FileNotFoundError(f'No ckpt-N.flax file in {p}: expected the original code\'s '
                            'checkpoints-0/ folder (holding ckpt-N.flax) or such a file.')
  return os.fspath(found[max(found)])


def _unwrap(tree: Any) -> Any:
  """Drops a redundant top-level {'params': ...} (a whole variables dict saved)."""
  if isinstance(tree, dict) and set(tree) == {'params'}:
    return tree['params']
  return tree


def read_original(path) -> dict:
  """Reads an original checkpoint (folder or ckpt-N.flax file) (docs/maths.md §8).

  Returns {'step': int, 'params', 'ema_params': nested dicts of numpy arrays,
  'opt_state': as stored (or None), 'file': the file read}. Raises FileNotFoundError
  for a missing path or a folder without ckpt-N.flax files, and OriginalCheckpointError
  for a file that is not msgpack of a dict with `step`, `params` and `ema_params`.
  """
  file = find_checkpoint_file(path)
  try:
    raw = epath.Path(file).read_bytes()
  except OSError as e:
    raise OriginalCheckpointError(f'Cannot read {file}: {e}') from e
  try:
    state = flax.serialization.msgpack_restore(raw)
  except Exception as e:  # pylint: disable=broad-except
    raise OriginalCheckpointError(
        f'{file} is not a readable flax msgpack checkpoint ({type(e).__name__}: {e}); '
        'the file may be truncated or of another format.') from e
  if not isinstance(state, dict):
    raise OriginalCheckpointError(
        f'{file} holds {type(state).__name__!r} data, not the original TrainState dict '
        f'with keys {", ".join(REQUIRED_KEYS)}, opt_state.')
  missing = [k for k in REQUIRED_KEYS if k not in state]
  if missing:
    raise OriginalCheckpointError(
        f'{file} lacks {", ".join(missing)} (it holds: {", ".join(map(str, state))}); '
        'expected the original TrainState dict {step, params, ema_params, opt_state}.')
  try:
    step = int(np.asarray(state['step']))
  except (TypeError, ValueError) as e:
    raise OriginalCheckpointError(
        f'{file}: step is not an integer: {state["step"]!r}') from e
  for key in ('params', 'ema_params'):
    if not isinstance(state[key], dict):
      raise OriginalCheckpointError(
          f'{file}: {key} is a {type(state[key]).__name__}, not a parameter dict.')
  return dict(step=step, params=_unwrap(state['params']),
              ema_params=_unwrap(state['ema_params']),
              opt_state=state.get('opt_state'), file=file)


# ------------------------------------------------------------------ matching
def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(tree))


def summarize(params: dict) -> str:
  """What model a (original or our) parameter tree describes, for mismatch messages."""
  flat = {'/'.join(k): np.shape(v) for k, v in _flat(params).items()}
  parts = []
  gamma = {k.split('/')[1] for k in flat if k.startswith('gamma/')}
  if not gamma:
    parts.append('schedule fixed_linear')
  elif gamma >= {'l1', 'l2', 'l3'}:
    parts.append('schedule learned_nnet, '
                 + ('pinned' if 'gamma_0' in gamma else 'free') + ' endpoints')
  elif gamma >= {'w', 'b'}:
    parts.append('schedule learned_linear')
  conv_in = flat.get('score_model/conv_in/kernel')
  conv_out = flat.get('score_model/conv_out/kernel')
  if conv_in and len(conv_in) == 4:
    parts.append(f'n_embd {conv_in[-1]}')
  parts.append('n_layer {}'.format(
      len({k.split('/')[1] for k in flat if k.startswith('score_model/down.block_')})))
  parts.append('attention ' + ('on' if any('/down.attn_' in k for k in flat) else 'off'))
  if conv_out and len(conv_out) == 4 and conv_in and len(conv_in) == 4:
    channels, inputs = conv_out[-1], conv_in[2]
    parts.append(f'{channels} image channel(s)')
    if channels and inputs % channels == 0 and inputs > channels:
      parts.append(f'{(inputs // channels - 1) // 2} Fourier frequencies')
    elif inputs == channels:
      parts.append('no Fourier features')
  return ', '.join(parts)


def match_params(saved: dict, abstract: Any, what: str, file: str) -> Any:
  """`saved` as a tree of numpy arrays of exactly `abstract`'s structure and dtypes.

  Every name and shape is checked (docs/maths.md §6); a difference raises
  CheckpointMismatchError naming every missing, unexpected or reshaped parameter.
  """
  flat_saved = _flat(saved)
  flat_abstract = _flat(abstract)
  diff = checkpoints.describe_mismatch(
      {'/'.join(k): np.shape(v) for k, v in flat_saved.items()},
      {'/'.join(k): tuple(v.shape) for k, v in flat_abstract.items()},
      limit=len(flat_saved) + len(flat_abstract))
  if diff:
    raise checkpoints.CheckpointMismatchError(
        f'The {what} of the original checkpoint {file} do not fit the model this config '
        f'builds:\n{diff}\nThe checkpoint holds: {summarize(saved)}.\nThe config builds: '
        f'{summarize(abstract)}.\nUse the config of the released model it comes from '
        '(configs/cifar10.py without augmentation, configs/cifar10_aug.py with), or set '
        'the model fields to match.')
  out = {}
  for key, spec in flat_abstract.items():
    value = np.asarray(flat_saved[key])
    if value.dtype != spec.dtype:
      if not (np.issubdtype(value.dtype, np.floating)
              and jnp.issubdtype(spec.dtype, jnp.floating)):
        raise checkpoints.CheckpointMismatchError(
            f'{what} {"/".join(key)} in {file} has dtype {value.dtype}, the model '
            f'{spec.dtype}.')
      value = value.astype(spec.dtype)
    out[key] = value
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(abstract),
      [out[k] for k in _flat_keys_in_tree_order(abstract)])


def _flat_keys_in_tree_order(tree) -> list:
  """The flatten_dict keys of `tree`'s leaves, in jax's leaf order."""
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(str(getattr(p, 'key', p)) for p in path) for path, _ in paths]


def _to_global(host_tree: Any, abstract_tree: Any) -> Any:
  """Host numpy leaves → global arrays with `abstract_tree`'s (replicated) shardings."""
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx]),
      host_tree, abstract_tree)


# ------------------------------------------------------------------ import
def import_checkpoint(config, path, workdir, image_shape: Optional[tuple] = None) -> str:
  """Writes an original checkpoint into `workdir` as our checkpoint; returns its folder.

  params, ema_params and step are taken over (checked name by name and shape by shape
  against the model `config.model` builds). The original's opt_state (optax of another
  layout) is NOT carried over: the optimiser state is fresh, so continuing training
  restarts Adam's moments and the learning-rate warm-up. Also writes config.json, so
  `--mode=eval` and `--mode=sample` work on the workdir. `image_shape` (H, W, C) replaces
  reading the dataset's shape. Refuses a workdir that already holds checkpoints.
  """
  wd = workdir_lib.Workdir(workdir)
  run = build_lib.build(config, image_shape=image_shape)
  if wd.has_checkpoint():
    raise FileExistsError(f'{wd.checkpoint_dir} already holds checkpoints; import into a '
                          'new --workdir (or move that folder aside).')
  original = read_original(path)
  abstract = run.abstract_state()
  params = match_params(original['params'], abstract.params, 'params', original['file'])
  ema_params = match_params(original['ema_params'], abstract.ema_params, 'ema_params',
                            original['file'])
  for name, tree in (('params', params), ('ema_params', ema_params)):
    bad = ['/'.join(k) for k, v in _flat(tree).items() if not np.all(np.isfinite(v))]
    if bad:
      raise OriginalCheckpointError(
          f'{original["file"]}: {name} holds non-finite values (NaN or Inf) in '
          f'{len(bad)} array(s), e.g. {", ".join(bad[:3])}; the checkpoint is damaged or '
          'from a diverged run. Nothing was imported.')
  step = original['step']
  params = _to_global(params, abstract.params)
  state = train_state.TrainState(
      step=_to_global(np.asarray(step, np.int32), abstract.step), params=params,
      opt_state=jax.jit(run.tx.init, out_shardings=run.replicated)(params),
      ema_params=_to_global(ema_params, abstract.ema_params),
      time_sampler=_to_global(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                           abstract.time_sampler), abstract.time_sampler))
  wd.create()
  with workdir_lock.hold(wd):
    manager = checkpoints.make_manager(wd, keep=config.training.keep_checkpoints,
                                       create=True)
    try:
      checkpoints.save(manager, step, state)
      manager.wait_until_finished()
    finally:
      manager.close()
    wd.write_config(config)
  logging.info('Imported %s (step %d) into %s; the optimiser state starts afresh.',
               original['file'], step, wd.checkpoint_dir)
  return str(wd.checkpoint_dir)
