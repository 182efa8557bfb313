"""The one path layer: every file a run writes or reads, on a local disk or a cloud URL (gs://...).

A workdir is either a local folder or a URL that etils.epath opens (gs:// through fsspec + gcsfs,
installed by `pip install -e '.[gcs]'`). Orbax's arrays go through tensorstore, which speaks gs://
itself; everything else (config, metrics.jsonl, TensorBoard events, samples, eval history) goes
through the functions here.

Files are written readable by the whole team (mode 0644 locally; an object store has no modes).
A local file is replaced atomically (temporary file, fsync, rename); an object store's single
upload is atomic itself. An object store cannot append, so `AppendFile` keeps the object's bytes
and uploads them whole on `flush` (at most every `min_interval_s`, and always on close).
"""

from __future__ import annotations

import io
import os
import tempfile
import time

from etils import epath

FILE_MODE = 0o644
_SCHEME_PACKAGES = {'gs': ('gcsfs', 'gcs'), 's3': ('s3fs', 's3')}


def is_local(path: str) -> bool:
  """Whether `path` is on a local file system, not a URL such as gs://bucket/run."""
  return '://' not in os.fspath(path)


def absolute(path: str) -> str:
  """An absolute local path (orbax needs one); URLs are returned as they are."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def join(path: str, *parts: str) -> str:
  """`path/part/...` as a string, for local paths and URLs alike."""
  return os.fspath(epath.Path(path).joinpath(*parts)) if parts else os.fspath(path)


def check_supported(path: str) -> None:
  """Raises ImportError naming the extra to install when `path`'s scheme has no file system."""
  path = os.fspath(path)
  if is_local(path):
    return
  scheme = path.split('://', 1)[0]
  package, extra = _SCHEME_PACKAGES.get(scheme, (None, None))
  if package is None:
    raise ValueError(f'path {path!r}: unknown URL scheme {scheme!r}; expected a local path or '
                     f'one of {sorted(s + "://" for s in _SCHEME_PACKAGES)}')
  try:
    __import__(package)
  except ImportError:
    raise ImportError(f'path {path!r} needs the {package} package: pip install -e '
                      f"'.[{extra}]'") from None


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def makedirs(path: str) -> None:
  """Creates `path` and its parents (a no-op on object stores, which have no folders)."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names of the entries of folder `path`, sorted; [] when it does not exist."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically (see the module docstring), mode 0644; returns path."""
  path = os.fspath(path)
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return path
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in cache
    os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path: str, text: str) -> str:
  return write_bytes(path, text.encode())


class AppendFile:
  """A file opened for appending bytes; on an object store, re-uploaded whole on flush."""

  def __init__(self, path: str, min_interval_s: float = 0.0):
    self.path = os.fspath(path)
    self._local = is_local(self.path)
    self._min_interval_s = min_interval_s
    if self._local:
      makedirs(os.path.dirname(os.path.abspath(self.path)))
      fresh = not os.path.exists(self.path)
      self._file = open(self.path, 'ab')
      if fresh:
        os.chmod(self.path, FILE_MODE)
      return
    # Continue what an earlier run wrote (a resumed run appends to the same metrics.jsonl).
    self._buffer = io.BytesIO()
    if exists(self.path):
      self._buffer.write(read_bytes(self.path))
    self._dirty, self._last_upload = False, 0.0

  def write(self, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    if self._local:
      self._file.write(data)
    else:
      self._buffer.write(data)
      self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self._local:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._last_upload >= self._min_interval_s):
      epath.Path(self.path).write_bytes(self._buffer.getvalue())
      self._dirty, self._last_upload = False, time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush(force=True)


class _TensorBoardFactory:
  """tensorboardX's writer factory for URLs, so that its event files go through this layer."""

  def open(self, path: str) -> AppendFile:
    return AppendFile(path)

  def directory_check(self, path: str) -> None:
    check_supported(path)


def register_tensorboard() -> None:
  """Routes tensorboardX's event files for every URL scheme above through AppendFile."""
  from tensorboardX import record_writer
  for scheme in _SCHEME_PACKAGES:
    record_writer.register_writer_factory(scheme, _TensorBoardFactory())
