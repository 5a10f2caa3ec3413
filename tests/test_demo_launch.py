"""The README's "try it on one machine" command on the bundled demo model: two ranks started by
`mlx.launch --backend ring -n 2` split the demo and print the text one process prints.

In float32 (`--dtype float32`): the ranks' all-sums add partial products in another order
than one process does, which bf16 rounding could turn into a flipped near-tie.
"""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import free_port_base, launch

import generate as generate_cli  # the script at the repository root (conftest)

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "mlx.launch --backend ring -n 2 -- python generate.py --draft-mtp"
EXACT = ["--dtype", "float32", "-m", "40"]
RULE = "\n" + "=" * 10


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))


def _text(out: str) -> str:
    return out.split(RULE)[0]


@pytest.fixture(scope="module")
def readme_args():
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    assert COMMAND in lines, "the README no longer shows the command this module tests"
    return COMMAND.split(" -- python generate.py ")[1].split() + EXACT


@pytest.fixture(scope="module")
def outputs(readme_args):
    """The command as two ranks (one launch for the module), then generate.py's main() in this
    process (the same code as one process runs; no second Python start-up)."""
    gen = [sys.executable, str(ROOT / "generate.py"), *readme_args]
    two = subprocess.run(
        [*launch(free_port_base()), *gen], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_cli.main(readme_args)
    return two.stdout, out.getvalue()


def test_two_ranks_print_the_text_of_one_process(outputs):
    """Before the demo's groups of 32, this launch failed: "cannot split this model over 2
    ranks: model.layers.1.self_attn.o_proj: its input width 192 ... groups of 64"."""
    two, one = outputs
    text = _text(one)
    assert len(text.strip()) > 20
    assert two.count(RULE) == 1  # rank 0 prints, rank 1 follows silently
    assert _text(two).endswith(text)
    assert "Generation: 40 tokens" in two and "Generation: 40 tokens" in one
