"""Errors that reach the user as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (flag, file, checkpoint): the message says what to change.

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read: names the file and tensor."""


class PipelineError(RuntimeError):
    """A failure of the running pipeline (a worker died, a peer timed out)."""
