"""A local stand-in for Google Cloud Storage (gcp-storage-emulator, in memory) for the gs:// tests.

  python tests/gcs_emulator.py PORT BUCKET

The emulator leaves out the `x-goog-generation` header of object downloads, which tensorstore
(orbax's array writer) reads to keep its OCDBT manifests consistent; it is added here.
"""

import sys
import time

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # not found: the response already says so
    return
  response['x-goog-generation'] = obj['generation']
  response['x-goog-metageneration'] = obj['metageneration']


objects.download = _download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402  (after the patch)


def main(port: int, bucket: str) -> None:
  server = create_server('localhost', port, in_memory=True, default_bucket=bucket)
  server.start()
  print('ready', flush=True)
  while True:
    time.sleep(3600)


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
