"""Benchmark the acknowledgement mark of a done batch (lrq.acker): ``chmod`` of the file
(what lrq does) against a rename ``done/`` -> ``acked/`` (the alternative), per batch, over
``--files`` 2 KB files in a temporary folder under ``--tmp`` (default: the current folder,
so the filesystem lrq runs on). Prints microseconds per batch for each.

    .venv/bin/python bench/ack_mark.py --files 20000
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--tmp", default=".")
    args = p.parse_args()
    d = tempfile.mkdtemp(prefix="lrq-bench-ack-", dir=args.tmp)
    try:
        os.mkdir(f"{d}/done")
        os.mkdir(f"{d}/acked")
        paths = [f"{d}/done/{i}.pkl" for i in range(args.files)]
        for path in paths:
            with open(path, "wb") as f:
                f.write(b"x" * 2000)
            os.chmod(path, 0o400)
        t = time.perf_counter()
        for path in paths:
            os.chmod(path, 0o600)
        chmod = (time.perf_counter() - t) / len(paths)
        t = time.perf_counter()
        for i, path in enumerate(paths):
            os.rename(path, f"{d}/acked/{i}.pkl")
        rename = (time.perf_counter() - t) / len(paths)
        print(f"files {args.files}: chmod {chmod * 1e6:.1f} us/batch, "
              f"rename done/->acked/ {rename * 1e6:.1f} us/batch")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
