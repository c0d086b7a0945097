"""The two ways a build can end badly, mapped onto exit codes by the CLI.

`UsageError` (exit 2): the input or the request is wrong; nothing was written.
`BudgetError` (exit 1): the build ran to completion but missed its parity or latency budget.
"""


class EdgecompError(Exception):
    """A failure the user can act on. Its message is one readable line."""

    exit_code = 2


class UsageError(EdgecompError):
    exit_code = 2


class BudgetError(EdgecompError):
    exit_code = 1
