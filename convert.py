"""Convert a Step-3.5/3.7-Flash HF checkpoint (BF16) to MLX, quantizing as it streams."""

import argparse
import sys

from mlx_step35 import convert
from mlx_step35.cli import user_errors
from mlx_step35.weights import QuantRecipe

R = QuantRecipe()


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="convert.py",
        description=__doc__ + " Memory stays at about one output shard (<= 5 GB) plus one "
        "tensor, so the 394 GB release converts on a 128 GB Mac. The output loads in "
        "mlx_step35.load (with the MTP blocks) and in stock mlx_lm.load (trunk only).",
        epilog="Example: python convert.py --hf-path ~/models/Step-3.5-Flash "
        "--mlx-path ~/models/Step-3.5-Flash-4bit -q",
    )
    p.add_argument("--hf-path", required=True, help="original checkpoint directory (or cached HF repo id)")
    p.add_argument(
        "--mlx-path",
        default="mlx_model",
        help="output directory (default: mlx_model); "
        "with --mtp-only, the existing MLX conversion to add the MTP blocks to",
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help=f"quantize: routed experts, attention and MLPs to --q-bits, router {R.router_bits}-bit, "
        f"embedding/lm_head/MTP heads {R.vocab_bits}-bit; norms and router bias stay unquantized",
    )
    p.add_argument(
        "--q-bits",
        type=int,
        default=R.bits,
        choices=[2, 3, 4, 5, 6, 8],
        help=f"bits for the bulk of the weights (default {R.bits})",
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        default=R.group_size,
        choices=[32, 64, 128],
        help=f"quantization group size (default {R.group_size})",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of unquantized weights (default bfloat16)",
    )
    p.add_argument(
        "--mtp-only",
        action="store_true",
        help="graft the MTP blocks of --hf-path onto the MLX conversion at --mlx-path "
        "(e.g. a community 4-bit Step-3.5 repo), reading only the shards that hold them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--force", action="store_true", help="convert even when the working memory exceeds this machine's"
    )
    a = p.parse_args(argv)
    with user_errors(p.prog):
        if not a.mtp_only:
            check_memory(a)
        out = convert(
            a.hf_path,
            a.mlx_path,
            quantize=a.quantize,
            q_bits=a.q_bits,
            q_group_size=a.q_group_size,
            dtype=a.dtype,
            mtp_only=a.mtp_only,
            progress=not a.quiet and sys.stderr.isatty(),
            force=True,  # check_memory decided
        )  # no bar in logs/pipes
        print(f"wrote {out}")


def check_memory(a):
    """Print the conversion's working memory; exit 2 when it exceeds the machine's, unless --force."""
    from mlx_step35.conversion import working_memory
    from mlx_step35.memory import gb

    need, device = working_memory(
        a.hf_path, quantize=a.quantize, q_bits=a.q_bits, q_group_size=a.q_group_size, dtype=a.dtype
    )
    what = f"working memory about {gb(need)} of this machine's {gb(device.memory)}"
    if need > device.memory and not a.force:
        print(
            f"convert.py: error: not enough memory to convert ({what}); --force converts anyway",
            file=sys.stderr,
        )
        sys.exit(2)
    print(what)


if __name__ == "__main__":
    main()
