"""Batch-file codecs measured on sample batches: bytes and speed against plain pickle.

``python bench/compression.py [--docs 1000] [--repeat 20]``. Codecs whose package is not
installed are listed as skipped.
"""
from __future__ import annotations

import argparse
import bz2
import json
import lzma
import pickle
import statistics
import time
import zlib
from collections.abc import Callable

from lrq.sample import documents

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def codecs() -> dict[str, Codec | str]:
    out: dict[str, Codec | str] = {
        "none": (lambda b: b, lambda b: b),
        "zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress),
        "zlib-6": (lambda b: zlib.compress(b, 6), zlib.decompress),
        "bz2-9": (bz2.compress, bz2.decompress),
        "lzma-0": (lambda b: lzma.compress(b, preset=0), lzma.decompress),
    }
    try:
        import lz4.frame as lz4f

        out["lz4"] = (lz4f.compress, lz4f.decompress)
    except ImportError:
        out["lz4"] = "pip install lz4"
    try:
        import zstandard

        for level in (1, 3):
            c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            out[f"zstd-{level}"] = (c.compress, d.decompress)
    except ImportError:
        out["zstd"] = "pip install zstandard"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    payload = pickle.dumps(documents(a.docs, seed=7), protocol=pickle.HIGHEST_PROTOCOL)
    rows = []
    for name, codec in codecs().items():
        if isinstance(codec, str):
            print(f"{name:8} skipped ({codec})")
            continue
        comp, decomp = codec
        t_c, t_d = [], []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            blob = comp(payload)
            t1 = time.perf_counter()
            assert decomp(blob) == payload
            t_d.append(time.perf_counter() - t1)
            t_c.append(t1 - t0)
        mb = len(payload) / 1e6
        rows.append({"codec": name, "bytes": len(blob), "ratio": len(blob) / len(payload),
                     "compress_MBps": mb / statistics.median(t_c),
                     "decompress_MBps": mb / statistics.median(t_d)})
    print(f"batch: {a.docs} documents, pickle {len(payload)} bytes")
    print(f"{'codec':8} {'bytes':>9} {'of pickle':>9} {'comp MB/s':>10} {'decomp MB/s':>12}")
    for r in rows:
        print(f"{r['codec']:8} {r['bytes']:9d} {r['ratio']:9.1%} {r['compress_MBps']:10.0f} "
              f"{r['decompress_MBps']:12.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
