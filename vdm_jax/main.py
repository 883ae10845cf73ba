r"""Command line: train, evaluate, sample, and import the original checkpoints.

  python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=train
  python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval \
      --config.eval.num_draws=4
  python -m vdm_jax.main ... --mode=phema  # choose the EMA on data held out of training

The workdir is a fixed place: the same command run again resumes from its newest
checkpoint. `--config.a.b=value` overrides any field (the config is locked: a typo is an
error). Exit status: 0 done; 2 a fault of input or environment, with a message that says
what to fix (--verbose adds the traceback); 75 stopped by SIGTERM/SIGINT, whenever it
came: after the step in flight and its checkpoint while training, else with nothing
changed (run the same command again).
"""

import json
import logging as std_logging
import sys

from vdm_jax.runtime import signals

# Signals are recorded from the first line on, while the modules below load (seconds),
# and acted on in main(); the console script `vdm_jax` installs this in run().
_SIGNALS_AT_START = signals.Deferred()
if __name__ == '__main__':
  _SIGNALS_AT_START.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdm_jax.codec import tools as codec_tools
from vdm_jax import errors
from vdm_jax.evaluation import evaluate
from vdm_jax.evaluation import posthoc_ema
from vdm_jax.evaluation import sample_quality
from vdm_jax.evaluation import sampling
from vdm_jax import original
from vdm_jax import reporting
from vdm_jax.runtime import compiler
from vdm_jax.runtime import host_memory
from vdm_jax.runtime import parallel
from vdm_jax.training import train
from vdm_jax import validation
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Fixed directory for checkpoints, logs, results.')
flags.DEFINE_enum('mode', 'train', ('train', 'eval', 'sample', 'phema', 'import_original',
                                    'compress', 'decompress'), 'What to do.')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume training although the saved config defines another model.')
flags.DEFINE_string('original_checkpoint', None,
                    "For --mode=import_original: the original code's checkpoints-0/ folder "
                    'or a ckpt-N.flax file in it.')
flags.DEFINE_string('input', None, 'For --mode=compress: images (.npz or a folder of '
                    'PNG files); for --mode=decompress: a compressed file.')
flags.DEFINE_string('output', None, 'For --mode=compress: the compressed file; for '
                    '--mode=decompress: a .npz or a folder for PNG files.')
flags.DEFINE_bool('overwrite', False, 'For --mode=compress and decompress: replace an '
                  'existing --output (a folder: its files of the same names).')
flags.DEFINE_bool('verbose', False, 'Show the traceback of every error.')
flags.DEFINE_string('compilation_cache', None, "Folder of JAX's persistent compilation "
                    'cache (a second run of the same model starts without compiling); '
                    'default $JAX_COMPILATION_CACHE_DIR, else vdm_jax/jax in the user\'s '
                    'cache folder; empty: no cache.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 '
                    '(not needed on TPU pods and SLURM).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, "Multi-host: this process's index.")
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_library_logs(verbose: bool) -> None:
  """Keeps the libraries' warnings and errors, without their tracebacks unless --verbose.

  orbax logs every step of every save at INFO; a failed asynchronous save (a full disk)
  is also logged by orbax and asyncio with tracebacks. The user gets it as one message
  from vdm_jax.reporting instead.
  """
  class _Filter(std_logging.Filter):
    def filter(self, record):
      if '/vdm_jax/' in record.pathname:
        return True
      if not verbose:
        message = record.getMessage()
        cut = message.find('Traceback (most recent call last)')
        if cut >= 0:
          record.msg, record.args = message[:cut].rstrip() + ' (--verbose shows more)', ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
      return '/orbax/' not in record.pathname or record.levelno >= std_logging.WARNING
  logging.get_absl_handler().addFilter(_Filter())


def _train(config):
  train.train_and_evaluate(config, FLAGS.workdir,
                           allow_config_change=FLAGS.allow_config_change,
                           on_storage_lost=reporting.stop_process)
  logging.info('Training finished.')


def _eval(config):
  results = evaluate.evaluate_workdir(config, FLAGS.workdir)
  if results.get('estimator') == 'ode':  # the probability-flow ODE's likelihood (§10)
    print(f"ODE: {results['nfe']:.0f} function evaluations per solve, "
          f"{results['seconds_per_image']:.3f} s per image and draw")
  if jax.process_index() == 0:
    print(f"test bpd {results['bpd']:.4f} ± {results['bpd_stderr']:.4f} "
          f"({results['num_examples']} images of split {results['split']!r}, "
          f"{results['num_draws']} draw(s) each, step {results['step']})")
    if 'bpd_iw' in results:  # the ODE's importance-weighted bound over the draws (§15.1)
      print(f"importance-weighted over {results['num_draws']} draws: {results['bpd_iw']:.4f} "
            f"± {results['bpd_iw_stderr']:.4f} (one draw: {results['bpd']:.4f})")
    print(json.dumps(results, indent=2, sort_keys=True))


def _sample(config):
  path, quality = sampling.sample_workdir(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(f'samples written to {path}')
    if quality is not None:
      print(sample_quality.summary(quality))
      print(f'written to {FLAGS.workdir}/{sample_quality.RESULTS_FILE}')


def _phema(config):
  results = posthoc_ema.select_workdir(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(posthoc_ema.summary(results))
    print(f'written to {FLAGS.workdir}/{posthoc_ema.RESULTS_FILE} and '
          f'{posthoc_ema.PLOT_FILE}')


def _import_original(config):
  path = original.import_checkpoint(config, FLAGS.original_checkpoint, FLAGS.workdir)
  print(f'imported {FLAGS.original_checkpoint} into {path}')


def _codec(config):
  validation.refuse_unsupported_mode(config, FLAGS.mode)
  command = (codec_tools.compress_command if FLAGS.mode == 'compress'
             else codec_tools.decompress_command)
  print(command(config, FLAGS.workdir, FLAGS.input, FLAGS.output, overwrite=FLAGS.overwrite))


MODES = {'train': _train, 'eval': _eval, 'sample': _sample, 'phema': _phema,
         'import_original': _import_original, 'compress': _codec, 'decompress': _codec}


# The flags each mode needs besides --config and --workdir, and what they name.
_NEEDED = {'import_original': {'original_checkpoint': "the original code's checkpoint"},
           'compress': {'input': 'the images: a .npz or a folder of PNG files',
                        'output': 'the compressed file to write'},
           'decompress': {'input': 'a file written by --mode=compress',
                          'output': 'a .npz, or a folder for PNG files'}}


def _usage_problems(argv) -> list[str]:
  """Stray arguments and the flags that FLAGS.mode needs but were not given."""
  missing = [f'--{name}=PATH ({what})'
             for name, what in _NEEDED.get(FLAGS.mode, {}).items() if not FLAGS[name].value]
  problems = [f'--mode={FLAGS.mode} needs ' + ' and '.join(missing)] if missing else []
  if len(argv) > 1:
    problems.append(f'unexpected argument(s) {" ".join(argv[1:])}: every setting is a '
                    '--flag=value (--help lists them)')
  return problems


def main(argv):
  with reporting.reported(verbose=FLAGS.verbose, workdir=FLAGS.workdir):
    if _SIGNALS_AT_START.signum is not None:
      raise errors.Stopped(_SIGNALS_AT_START.signum)
    signals.stop_at_once()  # training defers them again while it holds the workdir
    problems = _usage_problems(argv)
    if problems:
      raise errors.InputError('; '.join(problems) + '.')
    _quiet_library_logs(FLAGS.verbose)
    host_memory.keep_freed_memory()
    reporting.quiet_late_callbacks()
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    try:
      config = FLAGS.config
      config.to_dict()  # ml_collections loads the file on first use
    except Exception as e:  # pylint: disable=broad-except
      reporting.exit_with(reporting.describe_config_error(e, sys.argv), FLAGS.verbose, e)
    compiler.use_persistent_cache(compiler.cache_dir(FLAGS.compilation_cache))
    MODES[FLAGS.mode](config)


def _parse_flags(argv):
  """absl's flag parsing, with a message instead of a traceback for a bad --config."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    reporting.exit_with(str(e), verbose='--verbose' in argv)
  except Exception as e:  # pylint: disable=broad-except  # the config file itself raised
    reporting.exit_with(reporting.describe_config_error(e, argv), verbose='--verbose' in argv,
                     exc=e)


def run():
  """Console-script entry point (`vdm_jax ...`)."""
  _SIGNALS_AT_START.install()
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
