"""Shared CLI plumbing: one-line errors with exit status 2, no tracebacks."""

import argparse
import sys
from contextlib import contextmanager

from .config import ConfigError
from .distributed import PeerLost
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
    except PeerLost as e:  # several ranks (mlx.launch): another one is gone
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), without the usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
