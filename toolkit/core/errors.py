"""The one exception type for user-facing errors; the CLI turns it into one line and exit code 2."""

from __future__ import annotations


class DcncError(Exception):
    """Bad usage or bad input: a missing or corrupt file, a wrong shape, NaN in data, a mismatched checkpoint.

    The message is shown to the user as is, so it says what is wrong and where, in one line.
    """

    exit_code = 2


class GateFailed(Exception):
    """A parity or latency gate failed: the command ran correctly and the answer is "no" (exit code 1)."""

    exit_code = 1


def first_line(err: BaseException, fallback: str | None = None) -> str:
    """The first line of an exception's message, for a one-line DcncError; `fallback` (default: the exception's
    type name) when it says nothing. Libraries (onnx, onnxruntime, torch, TensorRT) raise multi-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else fallback or type(err).__name__
