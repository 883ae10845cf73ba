"""vdm_jax/codec/steps.py: the T levels placed at the quantiles of a step density
(docs/maths.md §9.1), its estimate from the network, and files that use it."""

import numpy as np
import pytest

from vdm_jax.codec import compressor
from vdm_jax.codec import steps

import test_codec


def test_a_flat_density_gives_equal_steps_in_gamma():
  g = steps.placed_gamma(-13.0, 5.0, (7,) * 32, 100)
  np.testing.assert_allclose(g, np.linspace(-13.0, 5.0, 101), atol=1e-5)
  assert (g[0], g[-1]) == (-13.0, 5.0)


def test_steps_follow_the_density():
  """Half the density's mass in the first of four bins: half the steps there, each a
  quarter of the width of those in the other bins."""
  density = (3, 1, 1, 1)
  g = steps.placed_gamma(0.0, 4.0, density, 60)
  assert np.all(np.diff(g) > 0)
  assert np.sum(g[1:] <= 1.0 + 1e-6) == 30
  np.testing.assert_allclose(np.diff(g)[:30], 1 / 30, rtol=1e-5)
  np.testing.assert_allclose(np.diff(g)[30:], 3 / 30, rtol=1e-5)


def test_quantised_densities_are_bytes_with_a_floor():
  q = steps.quantised(np.array([0.0, 1.0, 4.0, np.nan]))
  assert max(q) == 255 and min(q) >= 1 and all(isinstance(v, int) for v in q)
  # The empty bins keep FLOOR of the mean density: 0.05 against (0.95·4/1.25 + 0.05).
  assert q[0] == q[3] == round(255 * 0.05 / (0.95 * 4 / 1.25 + 0.05))
  assert steps.quantised(np.zeros(4)) == (255,) * 4
  with pytest.raises(ValueError, match='positive'):
    steps.placed_gamma(0.0, 1.0, (1, 0), 10)


def test_rate_placed_file_round_trips_and_records_its_density():
  images = test_codec.random_images(3)
  data, _ = test_codec.round_trip(images, step_placement='rate', first_images=2)
  header = compressor.read_header(data)
  assert len(header.step_density) == steps.BINS and min(header.step_density) >= 1
  model, params = test_codec.tiny_model()
  with pytest.raises(ValueError, match='step_placement'):
    compressor.compress(model, params, images, step_placement='even')
