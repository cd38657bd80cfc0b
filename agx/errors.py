"""The two ways a run ends early on purpose: the CLI prints the message on one line, no traceback."""


class UserError(Exception):
    """Bad input (config, data, workdir): exit 2."""


class RunError(Exception):
    """The run cannot go on (non-finite steps, a failed save); what is on disk is intact: exit 1."""
