"""Shared CLI plumbing: one-line errors with exit status 2, no tracebacks."""

import argparse
import sys
from contextlib import contextmanager

from .cache import KV_BITS, KV_GROUP_SIZE, QUANTIZED_KV_START
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


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def add_kv_arguments(p: argparse.ArgumentParser):
    """--kv-bits, --kv-group-size, --quantized-kv-start: mlx-lm's flags, our defaults."""
    p.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        choices=KV_BITS,
        help="store the full-attention layers' keys and values quantized to this many bits (e.g. 8 "
        "or 4; default: 16-bit); the sliding windows stay 16-bit",
    )
    p.add_argument(
        "--kv-group-size",
        type=int,
        default=KV_GROUP_SIZE,
        choices=[32, 64, 128],
        help="values per quantization group of the KV cache (default %(default)s)",
    )
    p.add_argument(
        "--quantized-kv-start",
        type=_non_negative,
        default=QUANTIZED_KV_START,
        help="with --kv-bits, positions from this one on are stored quantized, the first ones stay "
        "16-bit (default %(default)s)",
    )


def kv_arguments(a: argparse.Namespace) -> dict:
    """The keyword arguments of generate_step that `add_kv_arguments`' flags give."""
    return dict(kv_bits=a.kv_bits, kv_group_size=a.kv_group_size, quantized_kv_start=a.quantized_kv_start)
