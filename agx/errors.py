"""The two ways a run ends early on purpose: the CLI prints the message on one line, no traceback."""

import sys


class UserError(Exception):
    """Bad input (config, data, workdir): exit 2."""


class RunError(Exception):
    """The run cannot go on (non-finite steps, a failed save); what is on disk is intact: exit 1."""


def cli_exit(error: Exception) -> int:
    """What every command does with a UserError or RunError: one line on stderr, then its exit code."""
    print(f"agx: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UserError) else 1
