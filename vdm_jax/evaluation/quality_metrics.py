"""Sample-quality numbers between two sets of feature vectors (docs/maths.md §12).

Pure numpy in float64: the Fréchet distance of Gaussian fits, precision, recall,
density and coverage (Naeem et al. 2020) with k-nearest-neighbour balls, and the
statistics of a classifier's predictions. Nothing here knows where the features come
from (vdm_jax/evaluation/feature_net.py).
"""

import numpy as np


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(features, np.float64)
  return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix."""
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) of Gaussian fits (§12.1).

  Tr (Σ_a Σ_b)^½ = Σ_i √λ_i with λ_i the eigenvalues of the symmetric
  Σ_a^½ Σ_b Σ_a^½, which has the spectrum of Σ_a Σ_b.
  """
  mu_a, cov_a = _moments(features_a)
  mu_b, cov_b = _moments(features_b)
  root_a = _psd_sqrt(cov_a)
  middle = root_a @ cov_b @ root_a
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
               - 2.0 * trace_sqrt)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """‖a_i − b_j‖² [len(a), len(b)], clipped at 0 against rounding."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
  return np.clip(d, 0.0, None)


def _radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """Squared distance of each x_i to its k-th nearest neighbour in x (itself excluded)."""
  out = np.empty(len(x))
  for start in range(0, len(x), chunk):
    d = _squared_distances(x[start:start + chunk], x)
    out[start:start + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is x_i itself
  return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, chunk: int = 1024) -> dict:
  """Precision, recall, density, coverage of `fake` against `real` (§12.2).

  B(x, r_k(x)) is the ball around a feature reaching its k-th nearest neighbour in its
  own set; "inside" is strict (<), as in Naeem et al.'s code.
  """
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'precision and recall with k = {k} need more than {k} vectors in '
                     f'each set; got {len(real)} real and {len(fake)} generated.')
  r_real, r_fake = _radii(real, k, chunk), _radii(fake, k, chunk)
  balls_hit = np.zeros(len(fake))         # real balls containing each fake feature
  real_covered = np.zeros(len(real), bool)  # real ball containing some fake feature
  real_recalled = np.zeros(len(real), bool)  # real feature inside some fake ball
  for start in range(0, len(real), chunk):
    d = _squared_distances(real[start:start + chunk], fake)  # [real chunk, fake]
    inside_real = d < r_real[start:start + chunk, None]
    balls_hit += inside_real.sum(axis=0)
    real_covered[start:start + chunk] = inside_real.any(axis=1)
    real_recalled[start:start + chunk] = (d < r_fake[None, :]).any(axis=1)
  return dict(precision=float((balls_hit > 0).mean()),
              recall=float(real_recalled.mean()),
              density=float(balls_hit.sum() / (k * len(fake))),
              coverage=float(real_covered.mean()))


def class_statistics(probabilities: np.ndarray, confidence: float = 0.9) -> dict:
  """The share of images classified with confidence > `confidence`, and the entropy (in
  bits) of the histogram of predicted classes, log2(C) when every class is equally
  frequent (§12.3)."""
  p = np.asarray(probabilities, np.float64)
  counts = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
  freq = counts / counts.sum()
  nonzero = freq[freq > 0]
  return dict(confident_share=float((p.max(axis=1) > confidence).mean()),
              class_entropy_bits=float(-(nonzero * np.log2(nonzero)).sum()),
              class_counts=[int(c) for c in counts])
