#!/usr/bin/env python3
"""Redis's own CPU per call of the idempotency claim script (issue 14), without a client
in the way: `redis-benchmark` (pipelined) against a `redis-server` of its own, Redis CPU
per call from `INFO cpu` before and after, repetitions interleaved, medians.

    python3 benches/load/redis_script_cost.py [old-fencing.lua old-claim.lua]
    python3 benches/load/redis_script_cost.py --prototypes

With two file arguments (e.g. from `git show 8b02b9d:crates/keyward-redis/src/scripts/...`)
the old claim script is measured beside the current one. With `--prototypes`, the claim
designs of `benches/prototypes/` (not in the store) beside the current claim: the same
script as a Redis 7 function (`FCALL`), a hash record without the counter, a single-value
record with and without the counter, and a Lua-free `SET … NX PX … GET`. Needs
redis-server, redis-benchmark and redis-cli on PATH.
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates/keyward-redis/src/scripts")
PROTOTYPES = os.path.join(os.path.dirname(__file__), "..", "prototypes")
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

    prototypes = sys.argv[1:] == ["--prototypes"]

    def seed():
        cli("SET", "plain", "x" * 256)
        for size in (290, 4096):
            record = "idem:r:{replay%d}" % size
            cli("HSET", record, "s", "c", "f", fingerprint, "t", "1", "r", "x" * size)
            cli("SET", "idem:r:{string%d}" % size, "c" + fingerprint + "x" * size)
        if prototypes:
            library = ("#!lua name=kwproto\n" + open(os.path.join(ROOT, "fencing_set.lua")).read()
                       + "\nredis.register_function('claim', function(KEYS, ARGV)\n"
                       + open(os.path.join(ROOT, "idempotency/claim.lua")).read() + "\nend)\n")
            cli("-x", "FUNCTION", "LOAD", "REPLACE", stdin=library)

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
    variants = [("current", ["EVALSHA", load(current)], "replay")]
    if len(sys.argv) == 3:
        variants.append(("old", ["EVALSHA", load(script(sys.argv[1], sys.argv[2]))], "replay"))
    if prototypes:
        proto = lambda name: os.path.join(PROTOTYPES, name)
        variants += [
            ("as a function (FCALL)", ["FCALL", "claim"], "replay"),
            ("hash record, no counter",
             ["EVALSHA", load(script(proto("hash_no_counter.lua")))], "replay"),
            ("single-value record with the counter",
             ["EVALSHA", load(script(os.path.join(ROOT, "fencing_set.lua"),
                                     proto("string_record.lua"),
                                     proto("string_with_counter.lua")))], "string"),
            ("single-value record, no counter",
             ["EVALSHA", load(script(proto("string_record.lua"),
                                     proto("string_no_counter.lua")))], "string"),
        ]
    seed()
    cases = [("GET of 256 bytes", ["GET", "plain"], 150000, False)]
    for name, call, replayed in variants:
        for size in (290, 4096):
            record = "idem:r:{%s%d}" % (replayed, size)
            cases.append((f"{name}: replay of {size} bytes",
                          [*call, "2", record, record + ":n", fingerprint, "5000",
                           "86400000", "nonce"], 150000, False))
        cases.append((f"{name}: claim of a new key",
                      [*call, "2", "idem:r:{k__rand_int__}",
                       "idem:r:{k__rand_int__}:n", fingerprint, "5000", "86400000", "nonce"],
                      40000, True))
    if prototypes:
        held = "h" + fingerprint + "n" * 16
        cases.append(("Lua-free SET NX PX GET: replay of 290 bytes",
                      ["SET", "idem:r:{string290}", held, "NX", "PX", "5000", "GET"],
                      150000, False))
        cases.append(("Lua-free SET NX PX GET: claim of a new key",
                      ["SET", "idem:r:{k__rand_int__}", held, "NX", "PX", "5000", "GET"],
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
