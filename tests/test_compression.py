"""experiments/codec_compare.py: codec bpd, lossless round trips, the table."""

import json
import math

import numpy as np
import pytest

import common
from vdm_jax import config_base
from vdm_jax.data import datasets

compression = common.load_experiment('codec_compare.py')


def _digits_config(num_examples=8):
  config = config_base.get_config()
  config.data.dataset = 'digits'
  config.eval.num_examples = num_examples
  return config


@pytest.mark.parametrize('codec', list(compression.CODECS))
def test_codec_bpd_is_positive_finite_and_lossless(codec):
  images = datasets.load_split(_digits_config().data, 'test')[:8]
  for image in images:
    assert np.array_equal(compression.decode(compression.encode(image, codec), 1), image)
  bpd = compression.codec_bpd(images, codec)
  assert bpd.shape == (8,) and np.all(np.isfinite(bpd)) and np.all(bpd > 0)
  # Whole files of 8x8 images: bytes are integers, so bpd is a multiple of 8/64.
  np.testing.assert_allclose(bpd * 64 / 8, np.round(bpd * 64 / 8))


@pytest.mark.parametrize('channels', [2, 3, 4])
@pytest.mark.parametrize('codec', list(compression.CODECS))
def test_round_trip_of_colour_and_alpha_images(codec, channels):
  image = np.random.default_rng(channels).integers(0, 256, (6, 5, channels), np.uint8)
  assert np.array_equal(
      compression.decode(compression.encode(image, codec), channels), image)


def test_mean_stderr():
  mean, stderr = compression.mean_stderr(np.array([1.0, 2.0, 3.0, 4.0]))
  assert mean == 2.5
  assert math.isclose(stderr, np.std([1, 2, 3, 4], ddof=1) / 2)


def test_each_codec_reports_the_better_of_per_image_and_one_picture():
  images = datasets.load_split(_digits_config().data, 'test')[:8]
  rows = compression.codec_rows(images)
  assert [r['method'] for r in rows] == list(compression.CODECS)
  for r in rows:
    codec = r['method']
    assert r['per_image_bytes'] == sum(len(compression.encode(i, codec)) for i in images)
    assert r['per_image_bpd'] == pytest.approx(8 * r['per_image_bytes'] / (8 * 64))
    assert r['one_picture_bpd'] == pytest.approx(8 * r['one_picture_bytes'] / (8 * 64))
    assert r['bpd'] == min(r['per_image_bpd'], r['one_picture_bpd'])
    # Eight 8x8 digits in one picture: one header, and each image's neighbours to
    # predict from, so the picture is smaller than eight files.
    assert r['one_picture_bytes'] < r['per_image_bytes'] and 'one picture' in r['notes']
    assert math.isnan(r['bpd_stderr'])


def test_table_has_a_model_row_when_eval_results_exist(tmp_path):
  config = _digits_config(num_examples=8)
  without = compression.compare(config, str(tmp_path))
  assert [r['method'] for r in without['rows']] == [
      'PNG', 'WebP lossless', 'JPEG XL lossless']
  assert 'No model row' in compression.markdown(without)

  results = dict(bpd=2.5, bpd_stderr=0.1, num_examples=8, split='test', step=1000,
                 num_draws=4, params='ema', timesteps=0)
  (tmp_path / 'eval_results.json').write_text(json.dumps(results))
  table = compression.compare(config, str(tmp_path))
  assert table['num_images'] == 8 and table['image_shape'] == [8, 8, 1]
  model = table['rows'][-1]
  assert model['method'].startswith('VDM') and model['bpd'] == 2.5
  assert 'step 1000' in model['notes'] and 'WARNING' not in model['notes']
  compression.write(str(tmp_path), table)
  md = (tmp_path / 'compression.md').read_text()
  assert '| method | bpd | ± stderr | per image | one picture | notes |' in md
  assert '| VDM (this model) | 2.500 | 0.100 |  |  |' in md
  assert json.loads((tmp_path / 'compression.json').read_text())['rows'][-1]['bpd'] == 2.5

  # A model evaluated on other images is flagged.
  results['num_examples'] = 297
  (tmp_path / 'eval_results.json').write_text(json.dumps(results))
  assert 'WARNING' in compression.compare(config, str(tmp_path))['rows'][-1]['notes']


def test_table_has_the_bits_back_file_row_when_codec_results_exist(tmp_path):
  config = _digits_config(num_examples=8)
  results = dict(num_images=8, split='test', file_bytes=300, initial_bits=640,
                 timesteps=400, net_bpd=2.02, bound_bpd=2.00, file_bpd=4.69,
                 net_minus_bound_bpd=0.02, net_minus_bound_stderr=0.01)
  (tmp_path / 'codec_eval.json').write_text(json.dumps(results))
  row = compression.compare(config, str(tmp_path))['rows'][-1]
  assert row['method'] == 'VDM bits-back (actual file)' and row['bpd'] == 4.69
  assert 'T = 400' in row['notes'] and 'WARNING' not in row['notes']
  assert '| VDM bits-back (actual file) | 4.690 |  |  |  |' in compression.markdown(
      compression.compare(config, str(tmp_path)))
