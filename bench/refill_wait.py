"""How the sniffer waits to refill while paused on ``max_pending``: CPU of two ways to wake.

* ``poll`` (what :class:`lrq.sniffer.Sniffer` does): look at ``right/``'s mtime every few
  milliseconds (backing off to 0.1 s while nothing changes); when it moved, ``stat`` each
  watched pending name.
* ``inotify``: a prototype kept here only for the comparison: ctypes over libc's
  ``inotify_init1``/``inotify_add_watch`` on ``right/`` and ``select`` with a 0.1 s timeout
  (so ``stop`` is still seen); each claim's name arrives as an event.

Two phases per way, each on a fresh spool (``max_pending`` 50, so the low-water mark is 25):

* *stuck*: the backlog is full and nothing is claimed (workers in a slow handler) for
  ``--seconds``: the sniffer thread's CPU per second of waiting.
* *refill*: a claimer thread claims and marks done one batch every ``1/--rate`` seconds (real
  :meth:`Spool.claim` and :meth:`Spool.mark_done`) for ``--seconds``: the sniffer thread's CPU
  per batch published (publishing included, the same for both), and how often the claimer
  found nothing pending (starved: the refill came too late).

Run: ``.venv/bin/python bench/refill_wait.py [--quick] [--seconds 5] [--rate 200] [--batch 100]``;
the table is printed and ``bench/results/<stamp>-refill.json`` written.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import select
import struct
import tempfile
import threading
import time
from pathlib import Path

from lrq.config import QueueConfig, SourceConfig
from lrq.sniffer import Sniffer
from lrq.spool import Spool
from lrq.testing import MemorySource

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
EVENT = struct.Struct("iIII")


class Timed(Sniffer):
    """The sniffer, adding up its thread's CPU spent in the refill wait."""

    wait_cpu = 0.0

    def _wait_for_room(self, watch: dict[str, int], deadline: float,
                       stop: threading.Event) -> bool:
        t0 = time.thread_time()
        try:
            return self._wait(watch, deadline, stop)
        finally:
            self.wait_cpu += time.thread_time() - t0

    def _wait(self, watch: dict[str, int], deadline: float, stop: threading.Event) -> bool:
        return super()._wait_for_room(watch, deadline, stop)


class InotifySniffer(Timed):
    """The sniffer with its refill wait driven by inotify events on ``right/``."""

    def _wait(self, watch: dict[str, int], deadline: float, stop: threading.Event) -> bool:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0 or libc.inotify_add_watch(fd, str(self.spool.right).encode(),
                                            IN_CREATE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        try:
            self._prune(watch)  # claims made before the watch existed
            while not self._low(len(watch), sum(watch.values())):
                left = deadline - self.clock()
                if left <= 0 or stop.is_set():
                    return False
                if not select.select([fd], [], [], min(0.1, left))[0]:
                    continue
                self.looks += 1
                data = os.read(fd, 1 << 16)
                at = 0
                while at < len(data):
                    _, _, _, n = EVENT.unpack_from(data, at)
                    name = data[at + EVENT.size:at + EVENT.size + n].rstrip(b"\0").decode()
                    watch.pop(name.split(".")[0], None)
                    at += EVENT.size + n
            return True
        finally:
            os.close(fd)


def measure(kind: str, seconds: float, rate: float, batch: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for phase in ("stuck", "refill"):
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            spool = Spool(Path(tmp), "docs", key=b"k" * 32).ensure()
            q = QueueConfig(name="docs", handler="x:y", source=SourceConfig(), batch_size=batch,
                            max_pending=50)
            cls = InotifySniffer if kind == "inotify" else Timed
            sn: Timed = cls(q, spool, MemorySource([{"doc_id": i} for i in range(batch * 100_000)]))
            stop, published = threading.Event(), [0]

            def sniff(sn: Timed = sn, stop: threading.Event = stop,
                      published: list[int] = published) -> None:
                published[0] = sn.tick(max_seconds=seconds + 1, stop=stop)

            th = threading.Thread(target=sniff)
            th.start()
            while len(spool.pending(ordered=False)) < 50:  # the backlog full: measure from here
                time.sleep(0.01)
            assert th.ident is not None
            clock = time.pthread_getcpuclockid(th.ident)
            cpu0 = time.clock_gettime(clock)
            starved = claimed = 0
            t0 = time.monotonic()
            if phase == "stuck":
                stop.wait(seconds)
            else:
                while time.monotonic() - t0 < seconds:
                    c = spool.pick()
                    if c is None:
                        starved += 1
                    else:
                        spool.mark_done(c)
                        claimed += 1
                    time.sleep(1 / rate)
            cpu = time.clock_gettime(clock) - cpu0
            stop.set()
            th.join()
            if phase == "stuck":
                out["stuck_cpu_per_s_ms"] = cpu / seconds * 1e3
            else:
                out["refill_cpu_per_batch_us"] = cpu / max(published[0] - 50, 1) * 1e6
                out["refill_wait_cpu_per_batch_us"] = sn.wait_cpu / max(published[0] - 50, 1) * 1e6
                out["refill_starved"] = starved
                out["refill_claimed"] = claimed
            out[f"{phase}_looks"] = sn.looks
            out[f"{phase}_refills"] = sn.refills
    return out


def main() -> None:
    import run  # bench/run.py (first on sys.path): stamps, machine info, JSON reports

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="each phase (default 5)")
    ap.add_argument("--rate", type=float, default=200.0, help="batches claimed per second")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="2 s phases")
    a = ap.parse_args()
    seconds = 2.0 if a.quick else a.seconds
    stamp, report = run.new_report("benchmark", "refill wait", {
        "seconds": seconds, "rate": a.rate, "batch": a.batch, "max_pending": 50})
    rows: list[tuple[str, ...]] = [("way", "stuck ms CPU/s", "refill wait us/batch", "claimed",
                                    "sniffer us/batch", "starved", "looks", "refills")]
    for kind in ("poll", "inotify"):
        r = measure(kind, seconds, a.rate, a.batch)
        report["results"].append({"way": kind, **r})
        rows.append((kind, f"{r['stuck_cpu_per_s_ms']:.2f}",
                     f"{r['refill_wait_cpu_per_batch_us']:.0f}", f"{r['refill_claimed']:.0f}",
                     f"{r['refill_cpu_per_batch_us']:.0f}", str(r["refill_starved"]),
                     f"{r['stuck_looks']}/{r['refill_looks']}",
                     f"{r['stuck_refills']}/{r['refill_refills']}"))
    run.write_report(report, stamp, "refill", "\n".join(
        [f"refill wait, max_pending 50, batch {a.batch}, claims {a.rate:.0f}/s, {seconds:.0f} s "
         "per phase (looks and refills: stuck/refill)", *run._columns(rows, right=set(range(1, 8)))]))


if __name__ == "__main__":
    main()
