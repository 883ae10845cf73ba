r"""Command line: train, evaluate, sample (and import the original checkpoints).

  python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=train
  python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval \
      --config.eval.num_draws=4

The workdir is a fixed place: the same command run again resumes from its newest
checkpoint. `--config.a.b=value` overrides any field (the config is locked: a typo is
an error).
"""

import json
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdm_jax import checkpoints
from vdm_jax import ode
from vdm_jax import original
from vdm_jax import parallel
from vdm_jax import train
from vdm_jax import validation

MODES = ('train', 'eval', 'sample', 'import_original')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Fixed directory for checkpoints, logs, results.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir although its saved config defines another model.')
flags.DEFINE_string('original_checkpoint', None,
                    'For --mode=import_original: the original code\'s checkpoints-0/ '
                    'folder or a ckpt-N.flax file in it.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 '
                    '(not needed on TPU pods and SLURM).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax_info() -> None:
  """orbax logs every step of every save at INFO; keep its warnings and errors only."""
  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
  logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _quiet_orbax_info()
  config = FLAGS.config
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, FLAGS.workdir,
                               allow_config_change=FLAGS.allow_config_change)
      logging.info('Training finished.')
    elif FLAGS.mode == 'eval':
      if config.eval.estimator == 'ode':  # the probability-flow ODE's likelihood (§10)
        results = ode.evaluate_workdir(config, FLAGS.workdir)
        print(f"ODE: {results['nfe']:.0f} function evaluations per solve, "
              f"{results['seconds_per_image']:.3f} s per image and draw")
      else:
        results = train.evaluate_workdir(config, FLAGS.workdir)
      if jax.process_index() == 0:
        print(f"test bpd {results['bpd']:.4f} ± {results['bpd_stderr']:.4f} "
              f"({results['num_examples']} images of split {results['split']!r}, "
              f"{results['num_draws']} draw(s) each, step {results.get('step', '?')})")
        print(json.dumps(results, indent=2, sort_keys=True))
    elif FLAGS.mode == 'sample':
      path = train.sample_workdir(config, FLAGS.workdir)
      if jax.process_index() == 0:
        print(f'samples written to {path}')
    elif FLAGS.mode == 'import_original':
      if not FLAGS.original_checkpoint:
        raise app.UsageError('--mode=import_original needs --original_checkpoint=PATH.')
      path = original.import_checkpoint(config, FLAGS.original_checkpoint, FLAGS.workdir)
      print(f'imported {FLAGS.original_checkpoint} into {path}')
  except train.Preempted as e:
    logging.warning('%s', e)
    print(str(e), file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except (validation.ConfigError, FileNotFoundError, FileExistsError,
          checkpoints.CheckpointMismatchError, original.OriginalCheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run():
  """Console-script entry point (`vdm_jax ...`)."""
  app.run(main)


if __name__ == '__main__':
  run()
