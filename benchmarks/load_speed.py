"""Load time and peak memory of a 4-bit conversion: `mlx_step35.load` vs stock `mlx_lm.load`.

Each run is a fresh subprocess that imports both packages, then times only the load call (the
model's arrays evaluated). Arms run interleaved, round by round (A B C, A B C, ...), so a machine
shared with other work slows all arms alike; the summary is the median of per-round ratios to
mlx-lm with a 95% bootstrap interval, for wall time and for the process's CPU time (all
threads; less sensitive than wall time to other work on the machine). Peak anonymous memory
(RssAnon, polled every 5 ms by the parent: the process's own heap, not the page cache of the
shards) and VmHWM as in memory.py. Python's garbage collections during the load are counted by
generation (`gc.callbacks`): a full (generation-2) one walks every object the imports made and
costs about 0.1 s here, so a load that allocates more Python objects can pay it where another
does not.

Arms: `ours` (this checkout), `mlx_lm` (mlx_lm.load on the same folder), and optionally `before`
(`--before DIR`: another checkout of mlx_step35, e.g. the main branch, for a before/after).
The checkpoint has no MTP blocks, so both loaders read exactly the same tensors.

Usage: .venv/bin/python benchmarks/load_speed.py [--rounds 7] [--before /path/to/checkout] [--hf]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BUILD, ROOT, WIDE, interval, median, run_child  # noqa: E402

MB = 1 << 20
# 16 MoE layers of 64 experts x 512 x 512: ~1.7 GB bf16, ~0.5 GB at 4 bits
SHAPE = dict(WIDE, num_hidden_layers=18, moe_num_experts=64, moe_intermediate_size=512, share_expert_dim=512)

CHILD = r"""
import gc, json, sys, time
arm, path = sys.argv[1], sys.argv[2]
import mlx.core as mx
import mlx_lm
import mlx_step35
from mlx.utils import tree_flatten
collections = [0, 0, 0]  # garbage collections during the load, by generation
def count(phase, info):
    if phase == "start":
        collections[info["generation"]] += 1
gc.callbacks.append(count)
t, cpu = time.perf_counter(), time.process_time()
if arm == "mlx_lm":
    model, _ = mlx_lm.load(path)
else:
    model, _ = mlx_step35.load(path)  # an HF checkpoint: quantized to 4 bits while loading
mx.eval(model.parameters())
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
gc.callbacks.clear()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "seconds": seconds,
    "cpu": cpu,
    "collections": collections,
    "maxrss": int(status["VmHWM"].split()[0]) * 1024,
    "mlx_peak": mx.get_peak_memory(),
    "model_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
    "module": mlx_step35.__file__,
}))
"""


HF = BUILD / "loadspeed-hf"


def conversion() -> Path:
    """The 4-bit conversion (made once, under build/, in a subprocess so this one stays small)."""
    hf, out = HF, BUILD / "loadspeed-4bit"
    if not (out / "config.json").exists():
        code = (
            "import sys, json; sys.path.insert(0, 'tests'); from factory import make_checkpoint; "
            "from mlx_step35 import convert; a = json.loads(sys.argv[1]); "
            f"make_checkpoint({str(hf)!r}, mtp=False, num_shards=8, **a); "
            f"convert({str(hf)!r}, {str(out)!r}, quantize=True, max_shard_bytes=128 << 20)"
        )
        subprocess.run([sys.executable, "-c", code, json.dumps(SHAPE)], cwd=ROOT, check=True)
    return out


def run_once(arm: str, path: Path, checkout: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    return run_child([sys.executable, "-c", CHILD, arm, str(path)], arm, cwd=checkout, env=env)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--before", type=Path, default=None, help="another mlx_step35 checkout to compare")
    p.add_argument(
        "--hf",
        action="store_true",
        help="load the bf16 HF checkpoint instead (quantized while loading; needs --before)",
    )
    a = p.parse_args()
    path = conversion()
    arms = {"ours": ROOT} if a.hf else {"ours": ROOT, "mlx_lm": ROOT}
    if a.before:
        arms["before"] = a.before.resolve()
    path, base_arm = (HF, "before") if a.hf else (path, "mlx_lm")
    for arm, checkout in arms.items():  # warm-up: page cache filled, nothing recorded
        run_once(arm, path, checkout)
    runs = {arm: [] for arm in arms}
    for r in range(a.rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for arm in order:
            runs[arm].append(run_once(arm, path, arms[arm]))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint: {path} ({size / MB:.0f} MiB in {len(list(path.glob('*.safetensors')))} shards)")
    print(f"{a.rounds} interleaved rounds, fresh process per run, 1 warm-up run per arm first")
    head = f"ratio to {base_arm}, median (95% CI)"
    print(
        f"| arm | wall s, median (min-max) | wall {head} | CPU s, median | CPU {head} | peak anon MiB | VmHWM MiB "
        "| GCs per load, gen 0/1/2 (runs with a full GC) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        cells = [arm]
        for field in ("seconds", "cpu"):
            xs = [x[field] for x in runs[arm]]
            ratios = [x / y[field] for x, y in zip(xs, runs[base_arm])]
            lo, hi = interval(ratios)
            spread = f" ({min(xs):.3f}-{max(xs):.3f})" if field == "seconds" else ""
            cells += [f"{median(xs):.3f}{spread}", f"{median(ratios):.3f} ({lo:.3f}-{hi:.3f})"]
        cells += [f"{median([x[k] for x in runs[arm]]) / MB:.0f}" for k in ("peak_anon", "maxrss")]
        gcs = "/".join(f"{median([x['collections'][g] for x in runs[arm]]):g}" for g in range(3))
        cells.append(f"{gcs} ({sum(x['collections'][2] > 0 for x in runs[arm])}/{a.rounds})")
        print("| " + " | ".join(cells) + " |")
    print(f"model: {runs['ours'][0]['model_bytes'] / MB:.0f} MiB of parameters")
    print("modules: " + ", ".join(f"{arm}: {runs[arm][0]['module']}" for arm in arms))


if __name__ == "__main__":
    main()
