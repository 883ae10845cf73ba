"""Deterministic per-process batches: training order from (seed, step), one-pass evaluation.

Training order is a function of (seed, step) alone: grain's random-access index shuffle
over an infinite repetition of the training set (a fresh permutation every epoch, drawn
from the seed and the epoch); global batch k is stream positions [k*B, (k+1)*B), so
batches may straddle epochs. Process p of P takes rows [p*B/P, (p+1)*B/P) of each global
batch and reads only those images. Batches therefore do not depend on the number of
processes, and resuming at step k costs O(1). Datasets themselves: vdm_jax/data/datasets.py.
"""

from typing import Any, Iterator, Optional

import grain
import jax
import numpy as np

from vdm_jax.data import datasets


def _process_rows(global_batch_size: int, process_index: Optional[int],
                  process_count: Optional[int]) -> tuple[int, int]:
  """(first row, number of rows) of this process's share of every global batch."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'process_index={index} and process_count={count}: need '
                     '0 <= process_index < process_count.')
  if global_batch_size < 1 or global_batch_size % count:
    raise ValueError(f'global_batch_size={global_batch_size} does not divide among {count} '
                     f'processes; choose a positive multiple of {count}.')
  local = global_batch_size // count
  return index * local, local


def training_order(num_images: int, seed: int) -> grain.MapDataset:
  """Random access to the index of every stream position: one permutation per epoch."""
  return grain.MapDataset.range(num_images).shuffle(seed=seed % (1 << 32)).repeat()


def augmentation_draws(seed: int, step: int, global_batch_size: int):
  """Flip (bool [B]) and quarter turns (int [B] in 0..3) of global batch `step`."""
  rng = np.random.default_rng([1, seed % (1 << 64), step])
  flip = rng.random(global_batch_size) < 0.5
  rotate = rng.random(global_batch_size) < 0.5
  quarter_turns = rng.integers(1, 4, size=global_batch_size)  # 90, 180 or 270 degrees
  return flip, np.where(rotate, quarter_turns, 0)


def augment(images: np.ndarray, flip: np.ndarray, rotation: np.ndarray) -> np.ndarray:
  """Left-right flip where `flip`, then `rotation` quarter turns counter-clockwise (§8)."""
  out = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  for quarter_turns in (1, 2, 3):
    rows = rotation == quarter_turns
    if rows.any():
      out[rows] = np.rot90(out[rows], quarter_turns, axes=(1, 2))
  return out


def train_batches(data_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict[str, Any]]:
  """Yields this process's share of training batches start_step, start_step + 1, ...

  Each item is {'images': uint8 [local_B, H, W, C], 'conditioning': float32 [local_B]}.
  With `data.augment`, each image is flipped left-right with probability 1/2, then
  rotated by 90, 180 or 270 degrees with probability 1/2, and conditioning is 1.0 where
  either fired (docs/maths.md §8); the draws come from (seed, step, global row).
  """
  first, local_b = _process_rows(global_batch_size, process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  images = datasets.open_split(data_config, 'train')
  order = training_order(len(images), seed)

  def generate():
    step = start_step
    while True:
      start = step * global_batch_size + first
      batch = images[np.array([order[p] for p in range(start, start + local_b)], np.int64)]
      conditioning = np.zeros(local_b, np.float32)
      if data_config.augment:
        flip, rotation = augmentation_draws(seed, step, global_batch_size)
        flip, rotation = flip[first:first + local_b], rotation[first:first + local_b]
        batch = augment(batch, flip, rotation)
        conditioning = (flip | (rotation > 0)).astype(np.float32)
      yield {'images': batch, 'conditioning': conditioning}
      step += 1

  return generate()


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Global batches in one evaluation pass: ceil(num_examples / batch size)."""
  return -(-num_examples // global_batch_size)


def eval_batches(data_config, split: str, *, global_batch_size: int,
                 num_examples: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict[str, Any]]:
  """Yields one pass, in dataset order, over the first num_examples of a split.

  Each item is {'images': uint8 [local_B, H, W, C], 'conditioning': float32 zeros
  [local_B], 'mask': bool [local_B]}. The last global batch is padded with zero images
  and mask False, so over all processes every example appears once with mask True.
  Never augmented.
  """
  first, local_b = _process_rows(global_batch_size, process_index, process_count)
  images = datasets.open_split(data_config, split)
  total = len(images)
  num_examples = total if num_examples is None else num_examples
  if not 1 <= num_examples <= total:
    raise ValueError(f'num_examples={num_examples}: the {split} split has {total} images; '
                     f'choose 1..{total} or None for all.')

  def generate():
    for k in range(num_eval_batches(num_examples, global_batch_size)):
      indices = k * global_batch_size + first + np.arange(local_b)
      mask = indices < num_examples
      batch = np.zeros((local_b,) + images.shape[1:], np.uint8)
      batch[mask] = images[indices[mask]]
      yield {'images': batch, 'conditioning': np.zeros(local_b, np.float32), 'mask': mask}

  return generate()
