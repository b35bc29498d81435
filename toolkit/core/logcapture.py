"""Library logging kept off the terminal: while a command runs, records that torch, onnx, onnxruntime and
friends log (and Python warnings) are held in memory, written to a log file when asked or when dcnc fails
inside, and shown on stderr only with --verbose. dcnc's own one line is then the only thing a failure prints.

Libraries that print through their own stderr handlers (torch installs one on its loggers, with propagation
off) are caught too: while capturing, any logging.StreamHandler aimed at the terminal hands its records here.
ONNX Runtime logs from C++; its sessions take their severity from `ort_log_severity()`.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ORT_QUIET, ORT_VERBOSE = 4, 2  # onnxruntime severities: 4 fatal only, 2 warnings and up

_active: LogCapture | None = None


def ort_log_severity() -> int:
    """The log severity for ONNX Runtime sessions: warnings with --verbose, else fatal only (its errors come
    back as exceptions, which dcnc reports in its own words)."""
    return ORT_VERBOSE if _active is None or _active.verbose else ORT_QUIET


class LogCapture:
    """Hold library log records and warnings for the duration of a `with` block (see the module docstring).

    verbose: also show them on stderr as they come (and INFO records, not only warnings and errors). text(): what
    was held; write() puts it in a file."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self.echo = logging.StreamHandler(sys.stderr)
        self.echo.setFormatter(logging.Formatter(FORMAT))
        self._saved: tuple = ()

    def __enter__(self) -> LogCapture:
        global _active
        root = logging.getLogger()
        original = logging.StreamHandler.emit
        self._saved = (root.level, original, _active)
        ours = (self.handler, self.echo)
        verbose = self.verbose

        def emit(handler: logging.StreamHandler, record: logging.LogRecord) -> None:
            if handler in ours or getattr(handler, "stream", None) not in _terminal():
                original(handler, record)
                return
            self.handler.handle(record)  # a library's own terminal handler (torch's): held instead
            if verbose:
                original(handler, record)

        logging.StreamHandler.emit = emit  # type: ignore[method-assign]
        root.addHandler(self.handler)
        if verbose:
            root.addHandler(self.echo)
            root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        logging.captureWarnings(True)
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        root = logging.getLogger()
        level, emit, previous = self._saved
        logging.StreamHandler.emit = emit  # type: ignore[method-assign]
        logging.captureWarnings(False)
        root.removeHandler(self.handler)
        root.removeHandler(self.echo)
        root.setLevel(level)
        _active = previous

    def text(self) -> str:
        return self.buffer.getvalue()

    def write(self, path: str | Path | None, error: BaseException | None = None) -> Path:
        """Write the held records (and `error`'s traceback) to `path`, default a new file under the temp folder's
        dcnc-logs/; the path written. Raises OSError when it cannot be written."""
        if path is None:
            folder = Path(tempfile.gettempdir()) / "dcnc-logs"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"dcnc-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path = Path(path)
        text = f"dcnc {' '.join(sys.argv[1:])}\n{self.text()}"
        if error is not None:
            text += "".join(traceback.format_exception(error))
        with open(path, "a") as handle:
            handle.write(text)
        return path


def _terminal() -> tuple:
    return (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
