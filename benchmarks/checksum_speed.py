"""Which checksum for prompt-cache files (issue 22): the standard library's candidates over a
1 GB buffer, in 16 MiB chunks as the writer and the reader feed them, interleaved, medians.

    python benchmarks/checksum_speed.py --gb 1 --rounds 3
"""

import argparse
import hashlib
import platform
import statistics
import time
import zlib

import numpy as np

CHUNK = 16 << 20


def crc32(view):
    c = 0
    for i in range(0, len(view), CHUNK):
        c = zlib.crc32(view[i : i + CHUNK], c)
    return c


def adler32(view):
    c = 1
    for i in range(0, len(view), CHUNK):
        c = zlib.adler32(view[i : i + CHUNK], c)
    return c


def hashed(make):
    def run(view):
        h = make()
        for i in range(0, len(view), CHUNK):
            h.update(view[i : i + CHUNK])
        return h.hexdigest()

    return run


CANDIDATES = {
    "zlib.crc32": crc32,
    "zlib.adler32": adler32,
    "hashlib.blake2b": hashed(hashlib.blake2b),
    "hashlib.sha256": hashed(hashlib.sha256),
    "hashlib.md5": hashed(hashlib.md5),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    buf = np.random.default_rng(0).integers(0, 256, int(a.gb * 1e9), dtype=np.uint8)
    view = memoryview(buf)
    times = {k: [] for k in CANDIDATES}
    for _ in range(a.rounds):
        for name, fn in CANDIDATES.items():
            t = time.perf_counter()
            fn(view)
            times[name].append(time.perf_counter() - t)
    print(
        f"{platform.machine()} {platform.processor() or ''}, {a.gb:g} GB, {a.rounds} rounds, zlib {zlib.ZLIB_RUNTIME_VERSION}"
    )
    print("| hash | median s | GB/s |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| `{name}` | {m:.3f} | {a.gb / m:.2f} |")


if __name__ == "__main__":
    main()
