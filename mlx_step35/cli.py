"""Shared CLI plumbing: one-line errors with exit status 2, no tracebacks."""

import sys
from contextlib import contextmanager

from .config import ConfigError
from .safetensors_io import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError)


@contextmanager
def user_errors(prog: str):
    """Turn a bad-input exception into `prog: error: message` on stderr and exit 2."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
