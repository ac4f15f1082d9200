"""``POST /api/queues/NAME/items`` throughput against a plain file append + fsync, same run.

``endpoint``
    The web server (:mod:`lrq.web`, in this process, on 127.0.0.1) with a ``kind = "ingest"``
    queue; ``--clients`` threads post ``--requests`` requests each of ``--items`` items (a
    new connection per request, as the server speaks HTTP/1.0). Every 202 means appended
    and fsynced; concurrent requests share fsyncs (group commit: the fsync count is shown).
    The clients run in this process too, so their JSON and HTTP cost shares the GIL.
``append+fsync``
    The same request bodies appended to one file, one ``write`` and one ``fsync`` each, one
    thread: what a request costs at the least without HTTP or grouping.

Prints requests/s and items/s of both and their ratio; writes
``bench/results/<UTC timestamp>-ingest-http.json``.

    .venv/bin/python bench/ingest_http.py [--quick] [--clients 4] [--requests 250] [--items 100]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import new_report, write_report  # noqa: E402

from lrq import config, web  # noqa: E402
from lrq.webingest import Front  # noqa: E402

TOKEN = "bench-token"


def bodies(clients: int, requests: int, items: int) -> list[list[bytes]]:
    return [[json.dumps([{"id": f"c{c}-{r}-{i}", "content": "word " * 8} for i in range(items)])
             .encode() for r in range(requests)] for c in range(clients)]


def endpoint(folder: Path, work: list[list[bytes]]) -> dict[str, Any]:
    (folder / "lrq.toml").write_text(
        f'data_dir = "data"\ndb_url = "sqlite:///results.db"\nhttp_token = "{TOKEN}"\n'
        '[queues.events]\nhandler = "workers.wordcount:handle"\nkey = "id"\n'
        '[queues.events.source]\nkind = "ingest"\nmax_unread_bytes = "1GB"\n')
    server = web.Server(config.load(folder / "lrq.toml"), "127.0.0.1", 0).start()
    host, port = server.httpd.server_address[:2]
    codes: list[int] = []

    def client(mine: list[bytes]) -> None:
        for body in mine:
            conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
            conn.request("POST", "/api/queues/events/items", body,
                         {"Authorization": f"Bearer {TOKEN}"})
            r = conn.getresponse()
            r.read()
            conn.close()
            codes.append(r.status)

    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    try:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        front = server.web.ingest.front("events")
        assert isinstance(front, Front)
        fsyncs = front.writer.fsyncs
    finally:
        server.close()
    assert set(codes) == {202}, f"answers other than 202: {sorted(set(codes))}"
    return {"seconds": seconds, "fsyncs": fsyncs}


def append_fsync(folder: Path, work: list[list[bytes]]) -> dict[str, Any]:
    fd = os.open(folder / "plain.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        t0 = time.perf_counter()
        for mine in work:
            for body in mine:
                os.write(fd, body)
                os.fsync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"seconds": seconds, "fsyncs": sum(len(w) for w in work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=250, help="per client")
    ap.add_argument("--items", type=int, default=100, help="per request")
    ap.add_argument("--quick", action="store_true", help="--requests 50")
    args = ap.parse_args()
    if args.quick:
        args.requests = 50
    work = bodies(args.clients, args.requests, args.items)
    n_req = args.clients * args.requests
    rows = []
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        # On the checkout's filesystem, not /tmp (often tmpfs, where fsync is free).
        for name, fn in (("append+fsync", append_fsync), ("endpoint", endpoint)):
            r = fn(Path(tmp), work)
            rows.append({"name": name, **r, "requests_per_s": n_req / r["seconds"],
                         "items_per_s": n_req * args.items / r["seconds"]})
    ratio = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
    stamp, report = new_report("benchmark", "ingest-http", vars(args))
    report["results"] = rows
    report["ratio_endpoint_to_append_fsync"] = ratio
    table = "\n".join(
        [f"{'':<14} {'requests/s':>11} {'items/s':>10} {'fsyncs':>7}"]
        + [f"{r['name']:<14} {r['requests_per_s']:>11.0f} {r['items_per_s']:>10.0f} "
           f"{r['fsyncs']:>7}" for r in rows]
        + [f"endpoint / append+fsync: {ratio:.2f} ({n_req} requests of {args.items} items, "
           f"{args.clients} clients)"])
    write_report(report, stamp, "ingest-http", table)


if __name__ == "__main__":
    main()
