"""Sample quality as numbers, with the anchors that say what they mean (docs/maths.md §12).

Generated images are compared with the test split in a feature space learned from the
data (vdm_jax/evaluation/feature_net.py, or any feature function a user passes): the
Fréchet distance, precision, recall, density and coverage, and for a classifier the
share of confidently classified images and the entropy of the predicted classes. Two
other image sets of the same size are judged the same way beside them:

  floor    images of the train split (real digits the test split has not seen)
  ceiling  images whose pixels are drawn independently, each from its own marginal
           over the train split (the right ink in the right places, no shapes)

Every number is a function of the images, the data and the seeds: the same call gives
the same bits on one machine.
"""

import time
from typing import Callable, Optional, Union

import numpy as np

from vdm_jax.data import datasets
from vdm_jax.evaluation import feature_net
from vdm_jax.evaluation import quality_metrics

RESULTS_FILE = 'sample_quality.json'
SETS = ('samples', 'floor', 'ceiling')
METRICS = ('frechet_distance', 'precision', 'recall', 'density', 'coverage',
           'confident_share', 'class_entropy_bits')

Features = Union[feature_net.FeatureNetwork, Callable[[np.ndarray], np.ndarray]]


def independent_pixels(train: np.ndarray, num: int, seed: int) -> np.ndarray:
  """`num` images whose every sub-pixel is copied from a random train image: draws from
  the product of the per-pixel marginals of the train split (§12.5)."""
  rng = np.random.default_rng(seed)
  flat = train.reshape(len(train), -1)
  rows = rng.integers(0, len(train), size=(num, flat.shape[1]))
  return flat[rows, np.arange(flat.shape[1])].reshape((num,) + train.shape[1:])


def anchors(data_config, num: int, seed: int) -> dict:
  """{'floor': train images, 'ceiling': independent-pixel images}, `num` of each (the
  floor holds the whole train split when that is smaller)."""
  train = datasets.load_split(data_config, 'train')
  rng = np.random.default_rng(seed)
  floor = train[np.sort(rng.permutation(len(train))[:num])]
  return {'floor': floor, 'ceiling': independent_pixels(train, num, seed + 1)}


def _embed(features: Features, images: np.ndarray):
  """(features [N, D], class probabilities [N, C] or None)."""
  if isinstance(features, feature_net.FeatureNetwork):
    return features.features(images), features.probabilities(images)
  return np.asarray(features(images), np.float64), None


def _judge(features: Features, images, reference, k: int, confidence: float) -> dict:
  feats, probs = _embed(features, images)
  out = dict(num_images=len(images),
             frechet_distance=quality_metrics.frechet_distance(feats, reference),
             **quality_metrics.prdc(reference, feats, k))
  if probs is not None:
    out.update(quality_metrics.class_statistics(probs, confidence))
  return out


def evaluate_samples(samples: np.ndarray, config, features: Optional[Features] = None
                     ) -> dict:
  """The numbers of `samples` (integers in [0, V), [N, H, W, C]) against the test split
  of config.data, beside the floor and ceiling anchors of the same size.

  `features`: the trained network of config.data (None: feature_net.load_or_train) or
  any function images → [N, D] features, e.g. Inception's on a machine that has its
  weights (then without the classifier's numbers). Settings: config.quality.
  """
  q = config.quality
  start = time.time()
  if features is None:
    features = feature_net.load_or_train(config)
  test = datasets.load_split(config.data, 'test')
  reference, reference_probs = _embed(features, test)
  results = {'reference': {'split': 'test', 'num_images': len(test)},
             'nearest_k': q.nearest_k}
  if reference_probs is not None:
    results['reference'].update(quality_metrics.class_statistics(reference_probs,
                                                                 q.confidence))
  image_sets = dict(samples=np.asarray(samples),
                    **anchors(config.data, len(samples), config.seed))
  for name in SETS:
    results[name] = _judge(features, image_sets[name], reference, q.nearest_k,
                           q.confidence)
  if isinstance(features, feature_net.FeatureNetwork):
    results['feature_network'] = dict(features.info)
  else:
    results['feature_network'] = {'kind': 'user', 'name': getattr(features, '__name__',
                                                                  type(features).__name__)}
  results['seconds_scoring'] = round(time.time() - start, 1)
  return results


def scalars(results: dict) -> dict:
  """{'quality/<set>/<metric>': value} for TensorBoard."""
  return {f'quality/{name}/{metric}': results[name][metric]
          for name in SETS for metric in METRICS if metric in results[name]}


def summary(results: dict) -> str:
  """A table for the console: one column per image set."""
  net = results['feature_network']
  how = (f"test accuracy {net['test_accuracy']:.4f}" if 'test_accuracy' in net else
         f"test squared error {net['test_mse']:.4f}" if 'test_mse' in net else 'user')
  lines = [f"sample quality: {results['samples']['num_images']} samples against the "
           f"{results['reference']['num_images']} test images, in the features of the "
           f"{net['kind']} ({how}); k = {results['nearest_k']}",
           f"{'':20}{'samples':>10}{'floor':>10}{'ceiling':>10}"]
  for metric in METRICS:
    if metric in results['samples']:
      lines.append(f'{metric:20}' + ''.join(f'{results[name][metric]:10.4f}' for name in SETS))
  lines.append('floor: train images; ceiling: independent pixels (docs/maths.md §12)')
  return '\n'.join(lines)
