"""What the command lines (main, export, bench) share: a bad argument is one `<program>: error: ...` line.

absl would answer a bad flag with a two-line FATAL, an override of an unknown field or a config file that is
not Python with a traceback, and a stray argument with the whole usage text; `flags_parser` turns each into
one line and exit code 2 (a usage error) before anything is loaded. Faults found later use `fail` with 1.
"""
import sys

from absl import flags


def fail(program, message, exit_code=2):
  print(f'{program}: error: {message}', file=sys.stderr)
  sys.exit(exit_code)


def one_line(text):
  """ml_collections' and absl's messages span lines; an error is one."""
  return ' '.join(str(text).split())


def innermost_message(error):
  """ml_collections wraps a KeyError('... Did you mean ...') in an AttributeError; show the text only."""
  while isinstance(error, BaseException) and error.args:
    error = error.args[0]
  return str(error)


def flags_parser(program, verbs=()):
  """A `flags_parser` for `app.run(main, flags_parser=...)`: absl's parsing, each failure one line (exit 2).

  Besides the flags, argv may hold one of `verbs` (export's `import`); anything else is refused. A
  `--config` file is loaded here, so a missing or broken one is reported before anything else happens.
  """

  def parse(argv):
    config_file = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), '')
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:  # a missing required flag, a value of the wrong type, an unknown flag
      fail(program, one_line(e))
    except SyntaxError as e:
      fail(program, f'--config={config_file} is not a Python config file ({e.msg}, line {e.lineno})')
    except OSError as e:  # a directory, an unreadable file
      fail(program, f'--config={config_file}: {one_line(e)}')
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      if 'get_config' in str(e):
        fail(program, f'--config={config_file} has no get_config() function (see configs/*.py)')
      overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
      fail(program, f'a --config override does not match the config ({overrides}): '
           f'{one_line(innermost_message(e))}')
    unexpected = rest[2:] if rest[1:2] and rest[1] in verbs else rest[1:]
    if unexpected:
      expected = f'at most one of {list(verbs)} first' if verbs else 'none'
      fail(program, f'unexpected arguments {unexpected} (expected {expected}); flags are --name=value')
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:
      try:
        config.get('objective')  # a config file that failed to load raises only when first used
      except OSError as e:
        reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()  # the attempt's own error
        fail(program, f'--config={config_file}: failed loading the config file: {reason}')
    return rest

  return parse
