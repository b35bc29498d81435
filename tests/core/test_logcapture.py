"""toolkit.core.logcapture: library logging and warnings held off the terminal, shown with verbose."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from toolkit.core.logcapture import ORT_QUIET, ORT_VERBOSE, LogCapture, ort_log_severity


@contextlib.contextmanager
def library_logger():
    """A logger with its own handler on the terminal (sys.stderr as the test sees it) and propagation off, as
    torch sets its loggers up."""
    logger = logging.getLogger("a_library")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_a_librarys_own_terminal_handler_is_held_not_printed(capsys):
    with library_logger() as logger:
        with LogCapture() as capture:
            logger.warning("Ran into an error when deserializing")
        assert capsys.readouterr().err == ""
        assert "Ran into an error when deserializing" in capture.text()
        logger.warning("after")  # the handler prints again once the command is over
        assert "after" in capsys.readouterr().err


def test_verbose_prints_it_too(capsys):
    with library_logger() as logger, LogCapture(verbose=True) as capture:
        logger.warning("shown")
    assert "shown" in capsys.readouterr().err and "shown" in capture.text()


def test_warnings_are_held(capsys):
    with LogCapture() as capture:
        warnings.warn("All-NaN slice encountered", RuntimeWarning, stacklevel=1)
    assert "All-NaN slice encountered" not in capsys.readouterr().err
    assert "All-NaN slice encountered" in capture.text()


def test_onnxruntime_logs_only_fatal_errors_unless_verbose():
    with LogCapture():
        assert ort_log_severity() == ORT_QUIET
    with LogCapture(verbose=True):
        assert ort_log_severity() == ORT_VERBOSE


def test_write_puts_the_records_and_the_traceback_in_the_file(tmp_path):
    with LogCapture() as capture:
        logging.getLogger("another_library").error("broken")
    try:
        raise RuntimeError("injected")
    except RuntimeError as err:
        path = capture.write(tmp_path / "dcnc.log", err)
    text = path.read_text()
    assert "ERROR another_library: broken" in text and "RuntimeError: injected" in text
