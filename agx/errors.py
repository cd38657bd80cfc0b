"""The two ways a run ends early on purpose: the CLI prints the message on one line, no traceback."""

import contextlib
import sys
import threading


class UserError(Exception):
    """Bad input (config, data, workdir): exit 2."""


class RunError(Exception):
    """The run cannot go on (non-finite steps, a failed save); what is on disk is intact: exit 1."""


def cli_exit(error: Exception) -> int:
    """What every command does with a UserError or RunError: one line on stderr, then its exit code."""
    print(f"agx: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UserError) else 1


class WholeLines:
    """A stream that passes on each thread's text a whole line at a time. After a save fails on a full
    disk, TensorStore's threads print tracebacks piece by piece; on an unbuffered stderr agx's error line
    landed inside one of them. A thread's unfinished line goes out when that thread flushes."""

    def __init__(self, stream):
        self.stream, self.lock, self.unfinished = stream, threading.Lock(), threading.local()

    def write(self, text: str) -> int:
        whole, newline, self.unfinished.text = (getattr(self.unfinished, "text", "") + text).rpartition("\n")
        if newline:
            self._out(whole + newline)
        return len(text)

    def flush(self) -> None:
        text, self.unfinished.text = getattr(self.unfinished, "text", ""), ""
        self._out(text)

    def _out(self, text: str) -> None:
        with self.lock:
            self.stream.write(text)
            self.stream.flush()

    def __getattr__(self, name):  # encoding, fileno, isatty...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def whole_lines_on_stderr():
    """sys.stderr as WholeLines for a command whose libraries print from their own threads."""
    stream, sys.stderr = sys.stderr, WholeLines(sys.stderr)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = stream
