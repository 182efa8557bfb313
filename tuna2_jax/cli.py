"""What the command-line tools share: one-line errors for user mistakes, and reading input images.

Every tool ends with

  if __name__ == '__main__':
    flags.DEFINE_...(...)  # here, not at import, so the tools can import each other
    cli.run(main)

Console: `--log_level` (default warning) sets what absl and the libraries that log through it
(orbax, jax) print; `info` brings back their per-save and per-restore lines. absl's own
`--verbosity`, when given, wins.

User mistakes are reported as `error: ...` on stderr with exit code 2 and no traceback:
  - a bad flag, a config file that fails to load, or a `--config.a.b=` override of a key the
    config does not have (ml_collections raises that as a KeyError/AttributeError, not a flag
    error), naming the new key for one that moved (config_lib.RENAMED_KEYS);
  - app.UsageError, InputError;
  - ValueError or FileNotFoundError raised by this package's own code: it raises them only with a
    message for the user that names the bad value (an impossible config, a checkpoint of another
    model, a workdir without a checkpoint). The same types raised inside a library are bugs and
    keep their traceback, as does everything else.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from typing import Callable, NoReturn

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tuna2_jax import config_lib

EXIT_USER_ERROR = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
LOG_LEVELS = {'debug': logging.DEBUG, 'info': logging.INFO, 'warning': logging.WARNING,
              'error': logging.ERROR}
_LOG_LEVEL = flags.DEFINE_enum('log_level', 'warning', list(LOG_LEVELS),
                               'What absl, orbax and jax print to the console.')


class InputError(ValueError):
  """An input file given on the command line cannot be used."""


def fail(message: str) -> NoReturn:
  """Prints `error: message` (details on further lines) to stderr and exits with code 2."""
  print(f'error: {message.strip() or "(no message)"}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _raised_here(e: BaseException) -> bool:
  """Whether e comes from a `raise` statement in this package's code (not from a call it made)."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None:
    return False
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  # The line test tells a deliberate raise from a C-implemented call (numpy) failing in our code.
  return (filename.startswith(_PACKAGE_DIR) and
          linecache.getline(filename, tb.tb_lineno).lstrip().startswith('raise '))


def _message(e: BaseException) -> str:
  """The text of an exception; unwraps ml_collections' AttributeError(KeyError('msg'))."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0] if len(e.args) == 1 else e)
  return '; '.join(line.strip() for line in text.splitlines() if line.strip())


def _unknown_key(argv: list[str], e: BaseException) -> str | None:
  """'--config.a.b=1: ...' when e is ml_collections refusing an override's key, else None."""
  detail = _message(e)
  for arg in argv[1:]:
    # An override is --<config flag>.<dotted path>[=value]; plain flag names have no dots.
    m = re.match(r'--?(\w+)\.([\w.]+)', arg)
    if not m or m.group(1) not in flags.FLAGS:
      continue
    path = m.group(2)
    if path in config_lib.RENAMED_KEYS:
      new = config_lib.RENAMED_KEYS[path]
      return (f'{arg}: {path} is now {new} (config_lib.RENAMED_KEYS); expected '
              f'--{m.group(1)}.{new}{arg[m.end():]}')
    if path in detail or any(f"'{p}'" in detail or f'"{p}"' in detail for p in path.split('.')):
      return f'{arg}: the config has no such key ({detail})'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file's own exception comes wrapped with its traceback text: keep its last line.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):
      lines = [lines[0], lines[-1]]
    fail(' '.join(lines))
  except (AttributeError, KeyError) as e:
    message = _unknown_key(argv, e)
    if message is None:
      raise
    fail(message)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main), reporting user mistakes (see the module docstring) in one line."""

  def guarded(argv):
    set_log_level()
    try:
      main(argv)
    except (app.UsageError, InputError) as e:
      fail(str(e))
    except (ValueError, FileNotFoundError) as e:
      if not _raised_here(e):
        raise
      fail(str(e))

  app.run(guarded, flags_parser=_parse_flags)


def set_log_level() -> None:
  """Applies --log_level unless absl's --verbosity was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(LOG_LEVELS[_LOG_LEVEL.value])


def config_file(flag_name: str = 'config') -> str:
  """The path of a config-file flag, checked to exist (config_flags defers a load error)."""
  if not flags.FLAGS[flag_name].present:
    raise app.UsageError(f'--{flag_name} is required')
  # The filename comes back with its ':args' part.
  path = config_flags.get_config_filename(flags.FLAGS[flag_name]).split(':', 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--{flag_name}: config file {path!r} not found')
  return path


def read_image(path: str, data) -> np.ndarray:
  """The image at `path` as uint8 RGB, resized and centre-cropped onto the nearest of the
  buckets config `data` trains on (the data.image_size square when it has none), exactly as
  training loads its images (data/images.py), so a non-square image is cropped, never squashed."""
  from tuna2_jax.data import images, records  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise InputError(f'image {path!r} not found')
  if not os.path.isfile(path):
    raise InputError(f'image {path!r} is not a file')
  try:
    with open(path, 'rb') as f:
      blob = f.read()
    return images.decode_to_bucket(blob, images.buckets_of(data), what=f'image {path!r}',
                                   resampler=data.get('resize', 'pillow'),
                                   max_pixels=data.get('max_image_pixels',
                                                       records.MAX_IMAGE_PIXELS))
  except OSError as e:
    raise InputError(f'image {path!r} could not be read: {e}') from None
  except records.Fault as e:
    raise InputError(f'image {path!r} could not be read: {e.detail}') from None
