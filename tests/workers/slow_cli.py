"""`megallama ...` with every tensor write slowed down, so a test can signal it mid-conversion.

Usage: python tests/workers/slow_cli.py SECONDS_PER_TENSOR convert hf2pth --input-dir A --output-dir B
The progress callback (called once per tensor written) sleeps; nothing else changes.
"""

import contextlib
import sys
import time

import megallama.cli.convert as cli_convert
from megallama.cli import main

DELAY = float(sys.argv.pop(1))


@contextlib.contextmanager
def slow_progress(title, total_bytes=None):
    def on_tensor(name, nbytes):
        time.sleep(DELAY)

    on_tensor.set_total = lambda nbytes: None
    yield on_tensor


cli_convert.byte_progress = slow_progress
main()
