"""A cache-writing process for the multi-process tests:
`python -m tests.storage.cache_child CACHE TOKENS MODE [ARGS]`.

MODE all SLEEP          write every pending shard (claimed_shards), SLEEP s after each; prints
                        the shards written as JSON
MODE rank R W           write the shards of rank R of W
MODE stall-mid-shard S  write shards before S, then stall forever after shard S's ids file is
                        in place and fsynced (the parent kills it there)
MODE hold S             claim shard S, print "holding", then sleep (the parent kills it)

CACHE and TOKENS may be URLs (the endpoint and credentials in the environment); LEASE_SECONDS
in the environment sets the term of a remote cache's leases.
"""

import json
import os
import sys
import time

import storage.cache
from storage import open_token_store
from tests.storage.cachedata import new_writer, teacher_outputs, write_all, write_one


def main() -> None:
    cache_path, tokens_path, mode, *args = sys.argv[1:]
    writer = new_writer(cache_path, open_token_store(tokens_path),
                        lease_seconds=float(os.environ.get("LEASE_SECONDS", 60)))
    outputs = teacher_outputs()
    if mode == "all":
        written = []
        for claim in writer.claimed_shards():
            with claim:
                write_one(writer, claim.shard, outputs)
                written.append(claim.shard)
                time.sleep(float(args[0]))
        print(json.dumps(written))
    elif mode == "rank":
        print(json.dumps(write_all(writer, outputs, rank=int(args[0]), world_size=int(args[1]))))
    elif mode == "hold":
        claim = writer.try_claim(int(args[0]))
        print("holding" if claim else "not claimed", flush=True)
        time.sleep(600)
    elif mode == "stall-mid-shard":
        stall_at = f"ids/c/{args[0]}/0"  # its folder, fsynced once the file is renamed in
        real_fsync = storage.cache._fsync

        def fsync_then_stall(path):
            real_fsync(path)
            if str(path).endswith(stall_at):
                print("stalled", flush=True)
                time.sleep(600)

        storage.cache._fsync = fsync_then_stall
        write_all(writer, outputs)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
