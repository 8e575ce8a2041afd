"""The error types the library raises; the CLI turns each into one line and its exit code.

Exit codes (docs/operations.md#exit-codes): 0 success, 1 a check ran and failed (CheckFailed, a FAIL verdict),
2 bad input (InputError, usage errors), 3 megallama itself broke (MegallamaError, any unexpected exception).
"""


class MegallamaError(Exception):
    """Base error, and the one for internal failures (a crashed worker): exit code 3."""

    exit_code = 3
    detail: str | None = None  # a worker's traceback, shown with MEGALLAMA_DEBUG=1 (the rank's own output is not)


class InputError(MegallamaError):
    """Bad input: missing files, contradicting shapes, impossible TP/PP, an unwritable output. Exit code 2."""

    exit_code = 2


class ArchitectureUnknown(InputError):
    """A checkpoint whose files do not give its architecture (the forks' args) and no --model-config: exit 2,
    but `inspect` still describes what the tensor shapes show."""


class CheckFailed(MegallamaError):
    """A check ran and failed (verdict FAIL, smoke test failure). Exit code 1."""

    exit_code = 1


INTERNAL_ERROR = MegallamaError.exit_code
