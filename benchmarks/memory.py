"""Peak memory of `convert -q` and of quantize-on-load `load`, on synthetic HF checkpoints.

Each measurement runs in a fresh subprocess. Peak RSS is the child's own VmHWM (high-water
RSS) read from /proc/self/status just before it exits; the parent also polls /proc/PID/status every 5 ms for the
peak anonymous RSS (RssAnon: the process's own heap, without the clean file pages of the
memory-mapped input shards, which the kernel can drop at will). "- base" columns subtract a
child that only imports mlx_step35 (python + mlx + mlx-lm + transformers) and exits.

Checkpoints (bf16, hidden 512, vocab 4096, 3 MTP blocks; made once under build/memory):
  small  ~120 MB   4 MoE layers of 16 experts x 512 x 512   (largest tensor 8 MiB)
  large  ~430 MB  16 MoE layers, the same tensor shapes      (largest tensor 8 MiB)
  wide   ~420 MB   4 MoE layers of 64 experts x 512 x 512   (largest tensor 32 MiB)

Usage: .venv/bin/python benchmarks/memory.py [--max-shard-mb 32]
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUILD = ROOT / "build" / "memory"
MB = 1 << 20
sys.path.insert(0, str(Path(__file__).parent))
from common import WIDE, run_child  # noqa: E402

BASE = dict(WIDE, moe_intermediate_size=512, share_expert_dim=512)
CHECKPOINTS = {  # name -> (overrides, input shards)
    "small": (dict(num_hidden_layers=6, moe_num_experts=16), 3),
    "large": (dict(num_hidden_layers=18, moe_num_experts=16), 9),
    "wide": (dict(num_hidden_layers=6, moe_num_experts=64), 9),
}

CHILD = r"""
import json, sys, time
mode, src, dst, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import mlx.core as mx
from mlx.utils import tree_flatten
import mlx_step35
out = {}
t = time.perf_counter()
if mode == "convert":
    mlx_step35.convert(src, dst, quantize=True, max_shard_bytes=shard)
elif mode == "load":
    model, _ = mlx_step35.load(src)
    out["model_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
out["seconds"] = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + execve, so a child's would start at
# its parent's peak
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["maxrss"] = int(status["VmHWM"].split()[0]) * 1024
out["mlx_peak"] = mx.get_peak_memory()
print(json.dumps(out))
"""


def measure(mode, src="", dst="", shard=0, repeats=3) -> dict:
    """The median run of `repeats` (by peak RSS) with the range of all; dst keeps the last output."""
    runs = sorted((_measure_once(mode, src, dst, shard) for _ in range(repeats)), key=lambda r: r["maxrss"])
    result = dict(runs[len(runs) // 2])
    result["range"] = (runs[0]["maxrss"], runs[-1]["maxrss"])
    return result


def _measure_once(mode, src, dst, shard) -> dict:
    if dst:
        shutil.rmtree(dst, ignore_errors=True)
    return run_child(
        [sys.executable, "-c", CHILD, mode, str(src), str(dst), str(shard)], f"{mode} {src}", cwd=ROOT
    )


def checkpoint(name) -> Path:
    path = BUILD / f"{name}-hf"
    if not (path / "config.json").exists():  # built in a subprocess: this one stays small
        shutil.rmtree(path, ignore_errors=True)
        overrides, shards = CHECKPOINTS[name]
        code = (
            "import sys, json; sys.path.insert(0, 'tests'); from factory import make_checkpoint; "
            f"make_checkpoint({str(path)!r}, num_shards={shards}, **json.loads(sys.argv[1]))"
        )
        subprocess.run([sys.executable, "-c", code, json.dumps({**BASE, **overrides})], cwd=ROOT, check=True)
    return path


def tensor_sizes(path: Path):
    """(total bytes, largest tensor bytes, largest file bytes) from the safetensors headers."""
    from mlx_step35.safetensors_io import ShardReader

    files = sorted(path.glob("*.safetensors"))
    sizes = [ShardReader(f).nbytes(k) for f in files for k in ShardReader(f).keys()]
    return sum(sizes), max(sizes), max(f.stat().st_size for f in files)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-shard-mb", type=int, default=32, help="output shard limit for convert")
    p.add_argument("--only", nargs="*", default=list(CHECKPOINTS), help="checkpoints to run")
    a = p.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    base = measure("baseline")
    print(
        f"baseline (python + import mlx_step35): peak RSS {base['maxrss'] / MB:.0f} MB, "
        f"RssAnon {base['peak_anon'] / MB:.0f} MB"
    )
    rows = []
    for name in a.only:
        src = checkpoint(name)
        out = BUILD / f"{name}-4bit"
        shutil.rmtree(out, ignore_errors=True)
        conv = measure("convert", src, out, a.max_shard_mb * MB)
        load = measure("load", src)
        total, largest, largest_file = tensor_sizes(src)
        out_total, _, out_shard = tensor_sizes(out)
        n_out = len(list(out.glob("*.safetensors")))
        rows.append((name, total, largest, largest_file, out_total, n_out, out_shard, conv, load))
        shutil.rmtree(out)

    print(f"\nconvert -q (max_shard_bytes {a.max_shard_mb} MiB) and load(quantize=True), MB = MiB")
    head = (
        "ckpt",
        "input",
        "largest tensor",
        "largest in-shard",
        "output",
        "out shards",
        "convert RSS",
        "- base",
        "anon - base",
        "mlx peak",
        "load RSS",
        "- base",
        "anon - base",
        "mlx peak",
        "model",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, total, largest, largest_file, out_total, n_out, out_shard, conv, load in rows:
        cells = [
            name,
            total,
            largest,
            largest_file,
            out_total,
            f"{n_out} (max {out_shard / MB:.0f})",
            conv["maxrss"],
            conv["maxrss"] - base["maxrss"],
            conv["peak_anon"] - base["peak_anon"],
            conv["mlx_peak"],
            load["maxrss"],
            load["maxrss"] - base["maxrss"],
            load["peak_anon"] - base["peak_anon"],
            load["mlx_peak"],
            load["model_bytes"],
        ]
        print("| " + " | ".join(c if isinstance(c, str) else f"{c / MB:.0f}" for c in cells) + " |")
    spread = [max(r[7]["range"][1] - r[7]["range"][0], r[8]["range"][1] - r[8]["range"][0]) for r in rows]
    print(f"\nmedian of 3 runs each; peak RSS spread between runs <= {max(spread) / MB:.0f} MB")
    print(
        "seconds: "
        + ", ".join(f"{r[0]} convert {r[7]['seconds']:.1f} / load {r[8]['seconds']:.1f}" for r in rows)
    )


if __name__ == "__main__":
    main()
