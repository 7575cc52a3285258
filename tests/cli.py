"""Running the command line in a subprocess, as a user would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fast tiny run: no kNN, frequent logs and checkpoints.
QUICK = ['--config=configs/mae_tiny_cpu.py', '--config.data.eval_split=', '--config.log.every_steps=5',
         '--config.checkpoint.every_steps=5', '--config.log.images_every_steps=1000']


def run_main(*args, env=None, timeout=900):
  return subprocess.run([sys.executable, '-m', 'mae_jax.main', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


def start_main(*args, env=None):
  return subprocess.Popen([sys.executable, '-u', '-m', 'mae_jax.main', *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
