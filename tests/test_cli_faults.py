"""Faults a new user meets on the command line: each one is refused with exit status 2
(a signal: 75) and a message naming the flag or field, and changes no file.

The command-line cases run as real processes on copies of one trained configs/test.py
workdir, and compare every file below the test's folder (workdir, input, where the
output would go) before and after. What can be shown in process (image files, paths,
validation, the lock) is shown there.
"""

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image
import pytest

import common
from vdm_jax import config_base
from vdm_jax import errors
from vdm_jax import validation
from vdm_jax.codec import compressor
from vdm_jax.codec import file_format
from vdm_jax.codec import images as images_lib
from vdm_jax.codec import paths
from vdm_jax.codec import tools
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock

CODEC = ['--config.codec.timesteps=4']  # a short chain: these tests are about faults, not rates


# ---------------------------------------------------------------------- helpers


def _files(root) -> dict:
  """{path relative to root: sha256} of every file below root (hidden ones included)."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _refused(root, workdir, *flags, code=2, expect=()):
  """Runs the CLI on `workdir`: it must exit with `code`, print no traceback but each
  text of `expect`, and leave every file below `root` as it was. Returns the output."""
  before = _files(root)
  proc = common.run_cli('--config=configs/test.py', f'--workdir={workdir}', *flags)
  output = proc.stdout + proc.stderr
  assert proc.returncode == code, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  for text in expect:
    assert text in output, (text, output[-3000:])
  assert _files(root) == before
  return output


def _config():
  config = common.load_config('test')
  config.codec.timesteps = 4
  return config


def _palette_png(path, indices, palette, transparency=None):
  image = Image.new('P', indices.shape[::-1])
  image.putpalette([v for colour in palette for v in colour])
  image.putdata(indices.ravel().tolist())
  kwargs = {} if transparency is None else {'transparency': transparency}
  image.save(path, 'PNG', **kwargs)


def _png_16bit(path, array):
  """A PNG of 16-bit samples, [H, W, C] with C in 1..4, written chunk by chunk."""
  h, w, c = array.shape
  rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in array)

  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))

  header = struct.pack('>IIBBBBB', w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def _shown(path) -> np.ndarray:
  """The pixels a viewer shows: RGBA, whatever the mode."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGBA'))


def _digits(n=2) -> np.ndarray:
  """n of sklearn's 8x8 digits, values 0..16, uint8 [n, 8, 8, 1]."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load_digits().images[:n].astype(np.uint8)[..., None]


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def trained(trained_test_workdir):
  """The session's workdir trained by configs/test.py: checkpoints 2, 4, 6, config.json."""
  assert workdir_lib.Workdir(trained_test_workdir).checkpoint_steps() == [2, 4, 6]
  return trained_test_workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the trained workdir in this test's folder."""
  shutil.copytree(trained, tmp_path / 'workdir')
  return tmp_path / 'workdir'


# -------------------------------------------------- PNG modes: exact or refused

RNG = np.random.default_rng(24)
GREY = RNG.integers(0, 256, (5, 7)).astype(np.uint8)
COLOUR = RNG.integers(0, 256, (5, 7, 3)).astype(np.uint8)
INDICES = RNG.integers(0, 6, (5, 7)).astype(np.uint8)
GREY_PALETTE = [(200, 200, 200), (0, 0, 0), (17, 17, 17), (255, 255, 255), (90, 90, 90),
                (3, 3, 3)]
COLOUR_PALETTE = [(200, 10, 10), (0, 0, 0), (17, 200, 5), (255, 255, 255), (9, 90, 250),
                  (3, 3, 3)]
# mode (as the file is written) -> (writer, channels read)
PNG_CASES = {
    '1': (lambda p: Image.fromarray(GREY > 127).save(p), 1),
    'L': (lambda p: Image.fromarray(GREY).save(p), 1),
    'L_2bit': (lambda p: Image.fromarray(GREY // 64 * 85).save(p, bits=2), 1),
    'L_transparent': (lambda p: Image.fromarray(GREY).save(p, transparency=int(GREY[0, 0])), 2),
    'LA': (lambda p: Image.fromarray(np.stack([GREY, 255 - GREY], -1), 'LA').save(p), 2),
    'P_grey': (lambda p: _palette_png(p, INDICES, GREY_PALETTE), 1),
    'P_colour': (lambda p: _palette_png(p, INDICES, COLOUR_PALETTE), 3),
    'P_grey_transparent': (lambda p: _palette_png(p, INDICES, GREY_PALETTE, 2), 2),
    'P_colour_transparent': (lambda p: _palette_png(p, INDICES, COLOUR_PALETTE, 2), 4),
    'RGB': (lambda p: Image.fromarray(COLOUR).save(p), 3),
    'RGB_transparent': (lambda p: Image.fromarray(COLOUR).save(
        p, transparency=tuple(int(v) for v in COLOUR[0, 0])), 4),
    'RGBA': (lambda p: Image.fromarray(np.concatenate([COLOUR, GREY[..., None]], -1)).save(p),
             4),
}


@pytest.mark.parametrize('case', list(PNG_CASES))
def test_every_png_mode_is_read_as_shown_and_written_back_the_same(tmp_path, case):
  write, channels = PNG_CASES[case]
  (tmp_path / 'in').mkdir()
  write(tmp_path / 'in' / 'a.png')
  images = images_lib.load_images(str(tmp_path / 'in'))
  assert images.dtype == np.uint8 and images.shape == (1, 5, 7, channels)
  images_lib.save_images(images, str(tmp_path / 'out'))
  np.testing.assert_array_equal(_shown(tmp_path / 'out' / '000000.png'),
                                _shown(tmp_path / 'in' / 'a.png'))


def _animated(path):
  frames = [Image.fromarray(GREY), Image.fromarray(255 - GREY)]
  frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize('write,expected', [
    (lambda p: Image.fromarray((GREY.astype(np.uint16) + 256)).save(p),
     ['a 16-bit greyscale PNG (Pillow mode I;16)',
      'Convert it to 8 bits per sample (mode L)']),
    (lambda p: _png_16bit(p, (COLOUR.astype(np.uint16) * 257)),
     ['a 16-bit RGB PNG', '8 bits per sample (mode RGB)']),
    (lambda p: _png_16bit(p, np.stack([GREY, GREY], -1).astype(np.uint16) * 257),
     ['a 16-bit greyscale and alpha PNG', '8 bits per sample (mode LA)']),
    (_animated, ['an animated PNG (2 frames)']),
    (lambda p: Image.fromarray(COLOUR).save(p, 'JPEG'), ['is a JPEG file, not a PNG']),
    (lambda p: p.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 20), ['cannot be read as a PNG']),
], ids=['I;16', 'RGB_16bit', 'LA_16bit', 'animated', 'jpeg', 'truncated'])
def test_a_png_that_cannot_be_read_exactly_is_refused_naming_mode_and_fix(
    tmp_path, write, expected):
  write(tmp_path / 'a.png')
  with pytest.raises(file_format.CodecError) as e:
    images_lib.load_images(str(tmp_path))
  for text in [str(tmp_path / 'a.png')] + expected:
    assert text in str(e.value)


@pytest.mark.slow
def test_a_palette_folder_is_coded_as_the_colours_it_shows(trained, tmp_path):
  """The palette maps index k to grey level 16 - k: coding the indices would invert it."""
  folder = tmp_path / 'pngs'
  folder.mkdir()
  for i, image in enumerate(_digits()):
    _palette_png(folder / f'{i}.png', image[..., 0], [(16 - k,) * 3 for k in range(17)])
  before = _files(trained)
  tools.compress_command(_config(), str(trained), str(folder), str(tmp_path / 'f.vdmc'))
  tools.decompress_command(_config(), str(trained), str(tmp_path / 'f.vdmc'),
                           str(tmp_path / 'decoded'))
  for i in range(2):
    np.testing.assert_array_equal(_shown(tmp_path / 'decoded' / f'{i:06d}.png'),
                                  _shown(folder / f'{i}.png'))
  assert _files(trained) == before


# ------------------------------------------------- images the model cannot code


def _no_compression(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the compression started')
  monkeypatch.setattr(compressor, 'compress', fail)


@pytest.mark.slow
@pytest.mark.parametrize('images,expected', [
    (np.repeat(_digits(), 3, axis=-1), ['the images have 3 channel(s), the model codes 1',
                                        'trained on digits, 8x8x1', 'greyscale (PNG mode L)']),
    (_digits() * 15, ['image values must lie in 0..16 (the model\'s vocab_size), got '
                      '0..240']),
], ids=['channels', 'values'])
def test_images_the_model_cannot_code_are_refused_before_compressing(
    trained, tmp_path, monkeypatch, images, expected):
  np.savez(tmp_path / 'in.npz', images=images)
  _no_compression(monkeypatch)
  with pytest.raises(file_format.CodecError) as e:
    tools.compress_command(_config(), str(trained), str(tmp_path / 'in.npz'),
                           str(tmp_path / 'out.vdmc'))
  for text in [f'--input={tmp_path / "in.npz"}'] + expected:
    assert text in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ['in.npz']


@pytest.mark.slow
def test_another_image_size_is_coded_exactly_with_a_warning(trained, tmp_path, caplog):
  images = np.tile(_digits(1), (1, 2, 2, 1))  # 16x16
  np.savez(tmp_path / 'in.npz', images=images)
  tools.compress_command(_config(), str(trained), str(tmp_path / 'in.npz'),
                         str(tmp_path / 'f.vdmc'))
  assert any('the images are 16x16, but the model was trained on 8x8' in r.getMessage()
             and 'never seen that size' in r.getMessage() for r in caplog.records)
  tools.decompress_command(_config(), str(trained), str(tmp_path / 'f.vdmc'),
                           str(tmp_path / 'out.npz'))
  np.testing.assert_array_equal(np.load(tmp_path / 'out.npz')['images'], images)


# -------------------------------------------------------------- unreadable .npz


@pytest.mark.parametrize('write', [
    lambda p: p.write_text('not a zip file'),
    lambda p: p.write_bytes(open(p.with_name('good.npz'), 'rb').read()[:300]),
    lambda p: np.savez(p, images=np.array([None, 1], dtype=object)),
], ids=['text', 'truncated', 'pickled'])
def test_a_file_that_is_not_a_readable_npz_is_refused_naming_input(tmp_path, write):
  np.savez(tmp_path / 'good.npz', images=_digits())
  path = tmp_path / 'bad.npz'
  write(path)
  with pytest.raises(file_format.CodecError,
                     match=rf'--input={path} is not a readable \.npz file \(\w+: .*numpy\.savez'):
    images_lib.load_images(str(path))


# -------------------------------------------------------- where the output goes


def test_input_and_output_are_checked_before_any_work(tmp_path, monkeypatch):
  np.savez(tmp_path / 'in.npz', images=_digits())
  (tmp_path / 'taken.vdmc').write_bytes(b'keep me')
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / '000000.png').write_bytes(b'keep me')
  monkeypatch.setattr(tools, '_restored', lambda *a: pytest.fail('the model was loaded'))
  before = _files(tmp_path)
  cases = [
      ('compress', 'in.npz', 'in.npz', ['--output=', 'is the --input']),
      ('compress', 'in.npz', 'taken.vdmc', ['exists', 'pass --overwrite to replace it']),
      ('compress', 'in.npz', 'folder', ['is a folder; name a file, e.g. --output=',
                                        'images.vdmc']),
      ('compress', 'in.npz', 'no/such/x.vdmc', [f'the folder {tmp_path / "no" / "such"} '
                                                'does not exist']),
      ('compress', 'missing.npz', 'x.vdmc', ['--input=', 'missing.npz does not exist']),
      ('compress', 'taken.vdmc', 'x.vdmc', ['is neither a .npz file nor a folder']),
      ('decompress', 'folder', 'x.npz', ['is a folder; --mode=decompress reads one file']),
      ('decompress', 'taken.vdmc', 'full', ['is a folder that holds files',
                                            'replace its files of the same names']),
      ('decompress', 'in.npz', 'taken.vdmc', ['is a file; decoded PNG files go to a folder']),
  ]
  for mode, source, target, expected in cases:
    command = tools.compress_command if mode == 'compress' else tools.decompress_command
    with pytest.raises(file_format.CodecError) as e:
      command(_config(), str(tmp_path), str(tmp_path / source), str(tmp_path / target))
    for text in expected + ['Nothing was written.']:
      assert text in str(e.value), (mode, source, target, str(e.value))
  assert _files(tmp_path) == before


def test_an_output_is_written_whole_and_replaced_only_when_asked(tmp_path):
  target = tmp_path / 'out.vdmc'
  target.write_bytes(b'old')
  for overwrite in (False, True):
    output = paths.Output(str(target), folder=False, overwrite=overwrite, example='x')
    assert bool(output.problems('elsewhere')) != overwrite
  with pytest.raises(RuntimeError):  # a command failing half-way leaves nothing behind
    with paths.Output(str(target), folder=False, overwrite=True, example='x').writing() as tmp:
      with open(tmp, 'wb') as f:
        f.write(b'half')
      raise RuntimeError
  assert os.listdir(tmp_path) == ['out.vdmc'] and target.read_bytes() == b'old'
  with paths.Output(str(target), folder=False, overwrite=True, example='x').writing() as tmp:
    with open(tmp, 'wb') as f:
      f.write(b'new')
  assert os.listdir(tmp_path) == ['out.vdmc'] and target.read_bytes() == b'new'
  folder = tmp_path / 'pngs'
  with paths.Output(str(folder), folder=True, overwrite=False, example='x').writing() as tmp:
    images_lib.save_pngs(_digits(), tmp)
  assert sorted(os.listdir(tmp_path)) == ['out.vdmc', 'pngs']
  assert sorted(os.listdir(folder)) == ['000000.png', '000001.png']


def test_a_full_disk_while_writing_the_output_names_output(tmp_path):
  disk = tmp_path / 'disk'
  common.mount_tmpfs(disk, 'size=64k')
  try:
    for name, folder in (('x.vdmc', False), ('pngs', True)):
      output = paths.Output(str(disk / name), folder=folder, overwrite=False, example='x')
      with pytest.raises(file_format.CodecError,
                         match=rf'--output={disk / name} cannot be written: the disk holding '
                         rf'{disk} is full \(No space left on device\); nothing was written '
                         r'there. Free space, or choose another --output.'):
        with output.writing() as tmp:
          with open(os.path.join(tmp, 'a.png') if folder else tmp, 'wb') as f:
            f.write(b'\0' * (1 << 20))
      assert os.listdir(disk) == []
  finally:
    subprocess.run(['umount', str(disk)])


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
  (tmp_path / 'ro').mkdir()
  with common.read_only(tmp_path / 'ro'):
    output = paths.Output(str(tmp_path / 'ro' / 'x.vdmc'), folder=False, overwrite=False,
                          example='x')
    with pytest.raises(file_format.CodecError,
                       match=r'--output=.*x\.vdmc cannot be written: Read-only file system'):
      with output.writing():
        pytest.fail('the work started')


# -------------------------------------------------------- every field validated

FLOAT_FIELDS = sorted(k for k, v in validation.flatten(config_base.get_config()).items()
                      if isinstance(v, float)) + ['optimizer.grad_clip']


@pytest.mark.parametrize('field', FLOAT_FIELDS)
def test_every_float_field_must_be_finite(field):
  for value in (float('nan'), float('inf'), float('-inf')):
    config = common.load_config('test')
    section, name = field.split('.')
    config[section][name] = value
    problems = validation.check_fields(config)
    assert problems == [f'config.{field} = {value}: must be a finite number.'], problems


@pytest.mark.parametrize('field,value,expected', [
    ('timesteps', 0, 'in 1..4294967295'), ('timesteps', -3, 'in 1..4294967295'),
    ('batch_size', 0, 'in 1..65535'), ('batch_size', 70000, 'in 1..65535'),
    ('first_group', 0, '≥ 1'), ('resolution', 0, 'in 1..65535'),
    ('first_resolution', -1, 'in 1..65535'), ('first_images', -1, 'in 0..4294967295'),
    ('support', 0, 'in 1..65535'),
])
def test_codec_fields_are_validated(field, value, expected):
  config = common.load_config('test')
  config.codec[field] = value
  assert validation.check_fields(config) == [
      f'config.codec.{field} = {value}: must be {expected}.']


# -------------------------------------------------------- a lock of any content


@pytest.mark.parametrize('content', ['[1, 2, 3]', '42', '"me"', 'null',
                                     '{"heartbeat": "now", "pid": 1}'])
def test_a_lock_file_that_holds_no_record_is_taken_over(tmp_path, content):
  wd = workdir_lib.Workdir(tmp_path)
  (tmp_path / workdir_lock.LOCK_FILE).write_text(content)
  with workdir_lock.hold(wd):
    assert workdir_lock._read(wd.path / workdir_lock.LOCK_FILE)['pid'] == os.getpid()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


# ------------------------------------------ the command line, as real processes


@pytest.mark.slow
def test_codec_faults_exit_2_naming_the_flag_and_change_nothing(workdir, tmp_path):
  np.savez(tmp_path / 'digits.npz', images=_digits())
  np.savez(tmp_path / 'rgb.npz', images=np.repeat(_digits(), 3, axis=-1))
  (tmp_path / 'notes.txt').write_text('not images')
  (tmp_path / 'truncated.npz').write_bytes((tmp_path / 'digits.npz').read_bytes()[:300])
  run = lambda *flags, expect: _refused(tmp_path, workdir, '--mode=compress', *CODEC,
                                        *flags, expect=expect)
  run(f'--input={tmp_path / "notes.txt"}', f'--output={tmp_path / "no" / "x.vdmc"}',
      expect=['is neither a .npz file nor a folder of PNG files',
              f'--output={tmp_path / "no" / "x.vdmc"}: the folder {tmp_path / "no"} does '
              'not exist'])
  run(f'--input={tmp_path / "truncated.npz"}', f'--output={tmp_path / "x.vdmc"}',
      expect=['--input=', 'truncated.npz is not a readable .npz file (BadZipFile'])
  run(f'--input={tmp_path / "rgb.npz"}', f'--output={tmp_path / "x.vdmc"}',
      expect=['rgb.npz: the images have 3 channel(s), the model codes 1'])
  run(f'--input={tmp_path / "digits.npz"}', f'--output={tmp_path / "x.vdmc"}',
      '--config.codec.timesteps=-3', '--config.codec.batch_size=0',
      '--config.codec.first_resolution=-1', '--config.codec.resolution=0',
      expect=['config.codec.timesteps = -3', 'config.codec.batch_size = 0',
              'config.codec.first_resolution = -1', 'config.codec.resolution = 0'])


@pytest.mark.slow
def test_a_refused_run_leaves_config_json_and_every_file_as_it_was(workdir, tmp_path):
  resume = ['--config.training.num_steps=8']
  _refused(tmp_path, workdir, *resume, '--config.optimizer.learning_rate=nan',
           expect=['config.optimizer.learning_rate = nan: must be a finite number'])
  with common.read_only(workdir / 'checkpoints'):
    _refused(tmp_path, workdir, *resume,
             expect=[f'cannot write to {workdir / "checkpoints"}', 'Read-only file system',
                     'nothing in it was changed'])


@pytest.mark.slow
def test_usage_errors_are_one_line_naming_the_flag(workdir, tmp_path):
  for flags, expected in (
      (['--mode=compress', 'stray'], ['--mode=compress needs --input=PATH', '--output=PATH',
                                      'unexpected argument(s) stray']),
      (['--mode=import_original'], ['--mode=import_original needs '
                                    '--original_checkpoint=PATH']),
  ):
    output = _refused(tmp_path, workdir, *flags, expect=expected)
    assert sum(line.startswith('error: ') for line in output.splitlines()) == 1
    assert 'python -m vdm_jax.main' not in output  # no help text


@pytest.mark.slow
def test_an_ode_that_needs_more_steps_names_the_field(workdir, tmp_path):
  _refused(tmp_path, workdir, '--mode=eval', '--config.eval.estimator=ode',
           '--config.ode.solver=heun', '--config.ode.max_steps=5',
           '--config.eval.num_examples=2',
           expect=['error: config.ode.max_steps = 5: the ODE solver did not reach t = 1',
                   'Raise --config.ode.max_steps'])


def _sigterm_caught(pid: int) -> bool:
  with open(f'/proc/{pid}/status') as f:
    caught = next(line for line in f if line.startswith('SigCgt:')).split()[1]
  return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize('moment', ['handler_installed', 'lock_taken'])
def test_sigterm_before_the_first_step_exits_75_and_leaves_nothing(workdir, tmp_path, moment):
  """SIGTERM as soon as the process catches it (while its modules load), or once it has
  taken the workdir's lock (while it restores the checkpoint to resume)."""
  before = _files(tmp_path)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'vdm_jax.main', '--config=configs/test.py',
       f'--workdir={workdir}', '--config.training.num_steps=8'], cwd=common.REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    lock = workdir / workdir_lock.LOCK_FILE
    ready = ((lambda: _sigterm_caught(proc.pid)) if moment == 'handler_installed'
             else lock.exists)
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == errors.PREEMPTED_EXIT_CODE, output[-3000:]
  assert 'error: Stopped by SIGTERM before anything was saved; nothing was changed.' in output
  assert 'Traceback' not in output
  assert _files(tmp_path) == before  # no lock.json, no checkpoint, config.json as it was
