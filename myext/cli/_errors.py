"""The error the subcommands raise for a bad command line."""


class CommandError(Exception):
    """A problem with the command line or its inputs: printed without a traceback, exit code 2."""
