"""Configs by name or path (vdm_jax/config_base.py), from any folder."""

import pytest

from vdm_jax import config_base
from vdm_jax import errors


def test_a_config_by_name_is_the_file_of_configs_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  by_name = config_base.load_config('test')
  by_path = config_base.load_config(str(config_base.CONFIGS / 'test.py'))
  assert by_name.to_dict() == by_path.to_dict()
  assert by_name.data.dataset == 'digits' and by_name.model.n_embd == 8
  assert config_base.load_config('mnist.py').data.dataset == 'mnist_embedded'


def test_a_config_file_elsewhere_loads_by_its_path(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('from vdm_jax import config_base\n\n\ndef get_config():\n'
                  '  config = config_base.load_config("test")\n'
                  '  config.seed = 7\n  return config\n')
  assert config_base.load_config(str(path)).seed == 7


@pytest.mark.parametrize('wrong', ['mnsit', 'nowhere/mnist.py'])
def test_an_unknown_config_is_refused_naming_the_known_ones(wrong):
  with pytest.raises(errors.InputError, match=r"No config .*\bmnist\b.*\btest\b"):
    config_base.load_config(wrong)
