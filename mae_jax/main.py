"""Command line: python -m mae_jax.main --config=configs/mae_vitb.py --workdir=DIR [--config.train.batch_size=N].

Multi-process runs add --coordinator_address/--num_processes/--process_id, or set MAE_JAX_DISTRIBUTED=1 where
JAX detects the cluster (TPU VMs, SLURM, Open MPI); see `mae_jax/distributed.py` and `launch/`.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import checkpoint, cli
from mae_jax import config as config_lib
from mae_jax import distributed, paths, preemption, sharding

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs; an existing run there is resumed.')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message, exit_code=2):
  cli.fail('mae_jax', message, exit_code)


parse_flags = cli.flags_parser('mae_jax')


def main(argv):
  del argv  # parse_flags refuses positional arguments
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = flags.FLAGS.config
  try:  # a bucket that is missing or out of reach is one line here, before JAX or the data start
    for what, path in ((f'--workdir={flags.FLAGS.workdir}', flags.FLAGS.workdir),
                       (f'config.init_from={config.init_from}', config.init_from)):
      if path and paths.is_remote(path):
        paths.check_remote(path, what)
  except paths.PathError as e:
    fail(e)
  try:
    if distributed.initialize_from_flags():  # before anything touches a device
      distributed.log(f'Joined a multi-process run: {distributed.describe()}')
  except distributed.DistributedError as e:
    fail(e)
  from mae_jax import train  # after distributed initialisation: nothing may touch a device before it
  try:
    train.train_and_evaluate(config, flags.FLAGS.workdir)
  except (config_lib.ConfigError, sharding.MeshError) as e:
    fail(e)
  except (train.NonFiniteError, checkpoint.CheckpointError) as e:  # faults during the run, not usage errors
    fail(e, exit_code=1)
  except preemption.Interrupted as e:  # SIGTERM or Ctrl-C: what was trained is saved
    distributed.log(e.message)
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
