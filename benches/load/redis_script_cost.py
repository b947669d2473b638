#!/usr/bin/env python3
"""Redis's own CPU per call of the idempotency claim script (issue 14), without a client
in the way: `redis-benchmark` (pipelined) against a `redis-server` of its own, Redis CPU
per call from `INFO cpu` before and after, repetitions interleaved, medians.

    python3 benches/load/redis_script_cost.py [old-fencing.lua old-claim.lua]

With two file arguments (e.g. from `git show 8b02b9d:crates/keyward-redis/src/scripts/...`)
the old claim script is measured beside the current one. Needs redis-server,
redis-benchmark and redis-cli on PATH.
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates/keyward-redis/src/scripts")
REPS = 5


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    port = str(free_port())
    tmp = tempfile.mkdtemp()
    server = subprocess.Popen(
        ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", port, "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.05)
        run(port)
    finally:
        server.terminate()


def run(port):
    def cli(*args, stdin=None):
        return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, text=True,
                              input=stdin).stdout.strip()

    def load(text):
        return cli("-x", "SCRIPT", "LOAD", stdin=text)

    def cpu():
        seconds = 0.0
        for line in cli("INFO", "cpu").splitlines():
            if line.startswith(("used_cpu_user:", "used_cpu_sys:")):
                seconds += float(line.split(":")[1])
        return seconds

    fingerprint = "F" * 32

    def seed():
        cli("SET", "plain", "x" * 256)
        for size in (290, 4096):
            record = "idem:r:{replay%d}" % size
            cli("HSET", record, "s", "c", "f", fingerprint, "t", "1", "r", "x" * size)

    def per_call(command, n, flush):
        if flush:
            # New keys start from an empty keyspace each time; the replayed records stay.
            cli("FLUSHALL")
            seed()
        before = cpu()
        subprocess.run(["redis-benchmark", "-p", port, "-n", str(n), "-c", "8", "-P", "16",
                        "-q", "-r", "1000000000", *command], capture_output=True)
        return (cpu() - before) * 1e6 / n

    def script(*files):
        return "#!lua\n" + "".join(open(f).read() for f in files)

    current = script(os.path.join(ROOT, "fencing_set.lua"),
                     os.path.join(ROOT, "idempotency/claim.lua"))
    variants = [("current", load(current))]
    if len(sys.argv) == 3:
        variants.append(("old", load(script(sys.argv[1], sys.argv[2]))))
    seed()
    cases = [("GET of 256 bytes", ["GET", "plain"], 150000, False)]
    for name, sha in variants:
        for size in (290, 4096):
            record = "idem:r:{replay%d}" % size
            cases.append((f"{name}: replay of {size} bytes",
                          ["EVALSHA", sha, "2", record, record + ":n", fingerprint, "5000",
                           "86400000", "nonce"], 150000, False))
        cases.append((f"{name}: claim of a new key",
                      ["EVALSHA", sha, "2", "idem:r:{k__rand_int__}",
                       "idem:r:{k__rand_int__}:n", fingerprint, "5000", "86400000", "nonce"],
                      40000, True))
    results = {name: [] for name, _, _, _ in cases}
    for _ in range(REPS):
        for name, command, n, flush in cases:
            results[name].append(per_call(command, n, flush))
    print("| call | Redis CPU per call (median, range) |")
    print("|---|---|")
    for name, _, _, _ in cases:
        values = results[name]
        print(f"| {name} | {statistics.median(values):.2f} µs "
              f"({min(values):.2f}–{max(values):.2f}) |")


if __name__ == "__main__":
    main()
