"""Import TensorFlow (and Keras on it) without its C++ log lines reaching the user's terminal.

A command's stderr is ours: a user error is one line.  ``TF_CPP_MIN_LOG_LEVEL=2`` silences TensorFlow's
info and warning lines, except some at import (TensorFlow 2.21: absl's "before absl::InitializeLog()"
preamble, and CPU-feature notices on CPUs with instructions the build does not use), written straight to
file descriptor 2 (presumably before the level applies).  So the first import runs with descriptor 2 pointed at a temp
file, and afterwards everything in it but absl's info and warning records is written back.  A user who asks
for TensorFlow's logs (``TF_CPP_MIN_LOG_LEVEL=0``) gets them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

LOG_LEVEL = "2"  # what we set unless the user chose: drop info and warnings, keep errors
# absl's record prefix: severity, date, time, thread id, file:line]
_RECORD = re.compile(r"^(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]\s]+:\d+\] ")
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CONTINUATION = "To enable the following instructions:"  # the CPU-feature notice's second line


def import_tensorflow():
    """``tensorflow``, imported quietly."""
    with _quiet_first_import("tensorflow"):
        import tensorflow as tf
    return tf


def import_keras():
    """``keras`` on its TensorFlow backend, imported quietly."""
    with _quiet_first_import("keras"):
        import keras
    return keras


def min_log_level() -> int:
    """The TensorFlow C++ log level in force (set to ours unless the user set one)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    try:
        return int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        return 0


def is_noise(line: str, level: int) -> bool:
    """Whether ``line`` is a TensorFlow/absl log line below ``level`` (0 info, 1 warning, 2 error)."""
    if level < 1:
        return False
    record = _RECORD.match(line)
    if record:
        return "IWEF".index(record["severity"]) < level
    return line.startswith(_PREAMBLE) or line.startswith(_CONTINUATION)


@contextlib.contextmanager
def _quiet_first_import(module: str) -> Iterator[None]:
    level = min_log_level()
    if module in sys.modules or level < 1:
        yield
        return
    with filtered_stderr(level):
        yield


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python writes alike), then write back all but the noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not is_noise(line, level))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
