"""A cache in object storage against the same cache on local disk: reading speed, and the
training step's speed against CE, with and without latency added to every request.

  data     bench.student's synthetic language (2,048 x 64 tokens), its trained teacher and a
           top-64 gap8 cache, on local disk and put in a local S3 server (moto on 127.0.0.1,
           bench.objectstore) with the token stores and the tokenizer
  servers  two TCP proxies in front of that server: one passing requests through, one adding
           LATENCY to each (a round trip to a real bucket's region)
  reader   tokens/s of `stream_batches` (batches of 32, one epoch, cache and tokens) from each
           place, in a fresh process (the server's threads stay in this one, as a server on the
           network would), the places alternating (median of READER_PASSES epochs)
  loop     bench.student's loop rows: CE from local disk, and KD from the local cache, from S3
           and from S3 with LATENCY, alternating step by step in one process (median step), in
           fresh processes (the median of their ratios to CE), for bench.student's two students:
           the 2 x 64 one, whose step is so short that reading weighs most, and the 4 x 256 one.
           The S3 server runs in this process, on the same two cores: moto answers a request
           in ~7 ms of CPU, which a real server would spend on its own machine

`python -m bench.remote` prints the tables.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench import work_dir
from bench import student as synthetic
from bench.objectstore import CREDENTIALS, Proxy, object_store
from bench.student import LOOP_PROCESSES, _subprocess_call, loop_rows_in_processes
from bench.tables import markdown_sections

LATENCY = 0.020
"""Seconds added to every request by the slow proxy: the issue's bar (>= 20 ms)."""
READER_PASSES, LOOP_STEPS = 3, 60
BATCH = 32


def run(*, teacher_steps: int = 400, loop_steps: int = LOOP_STEPS,
        loop_processes: int = LOOP_PROCESSES, reader_passes: int = READER_PASSES,
        root: Path | None = None) -> list[dict]:
    """Build the data in a temporary directory (or `root`), serve it, measure; the rows."""
    from precompute.logits import write_cache
    from storage.location import Remote, upload_folder
    from storage.tokens import open_token_store

    with work_dir(root, "remote") as tmp, object_store() as s3:
        base = tmp / "run"
        if not (base / "cache" / "train.zarr" / "zarr.json").is_file():
            from transformers import AutoModelForCausalLM

            synthetic.build_language(base, teacher_steps=teacher_steps)
            write_cache(AutoModelForCausalLM.from_pretrained(base / "teacher"),
                        store=open_token_store(base / "tokens" / "train.zarr"),
                        cache_path=base / "cache" / "train.zarr", teacher={"name": "bench"},
                        k=synthetic.CACHE_K, temperatures=synthetic.TEMPERATURES,
                        value_code="gap8", progress=False)
        os.environ.update(CREDENTIALS)  # for this process and the loop's subprocesses
        slow = Proxy(s3.server.get_host_and_port(), latency=LATENCY)
        try:
            endpoints = {"S3": s3.url, f"S3 + {LATENCY * 1000:.0f} ms": slow.url}
            bucket = Remote(f"s3://{s3.bucket}/bench", s3.options())
            for split in ("train", "val"):
                upload_folder(base / "tokens" / f"{split}.zarr",
                              bucket / "tokens" / f"{split}.zarr")
            upload_folder(base / "tokenizer", bucket / "tokens" / "tokenizer",
                          last="tokenizer.json")
            upload_folder(base / "cache" / "train.zarr", bucket / "cache" / "train.zarr")
            rows = _subprocess_call("reader_rows", str(base), bucket.url, endpoints,
                                    reader_passes, module="bench.remote")
            remote = {name: [f"storage.tokens={bucket.url}/tokens",
                             f"storage.caches={bucket.url}",
                             f"storage.options.endpoint_url={url}"]
                      for name, url in endpoints.items()}
            settings = {"CE baseline, local disk": ["distill.alpha=1"],
                        "KD, local disk": [],
                        **{f"KD, {name}": extra for name, extra in remote.items()}}
            for student, steps in ((synthetic.STUDENT, loop_steps),
                                   (synthetic.SMALL_STUDENT, loop_steps // 2)):
                shape = [f"student.{key}={value}" for key, value in student.items()]
                runs = {name: (synthetic.overrides(base, *extra, *shape), False)
                        for name, extra in settings.items()}
                loop = loop_rows_in_processes(runs, steps=steps, processes=loop_processes)
                rows += [{**row, "section": "loop (training step against CE; " + row["section"]
                          .removeprefix("loop (")} for row in loop]
            return rows
        finally:
            slow.close()


def reader_rows(base: str, bucket: str, endpoints: dict[str, str], passes: int) -> None:
    """Tokens/s of one epoch of `stream_batches` (cache and tokens) from each place: local
    disk under `base`, and `bucket` through each of `endpoints`; prints the rows as JSON."""
    import json

    from storage.cache import open_cache
    from storage.location import Remote
    from storage.reader import stream_batches
    from storage.tokens import open_token_store

    base = Path(base)
    places = {"local disk": (base / "tokens" / "train.zarr", base / "cache" / "train.zarr")}
    for name, url in endpoints.items():
        options = {"endpoint_url": url}
        places[name] = (Remote(f"{bucket}/tokens/train.zarr", options),
                        Remote(f"{bucket}/cache/train.zarr", options))
    rates: dict[str, list[float]] = {name: [] for name in places}
    for epoch in range(passes):
        for name, (tokens_at, cache_at) in places.items():
            tokens = open_token_store(tokens_at)
            cache = open_cache(cache_at, token_store=tokens)
            started, seen = time.perf_counter(), 0
            for batch in stream_batches(tokens=tokens, caches=[cache], batch_size=BATCH, seed=0,
                                        epoch=epoch, prefetch=0):
                seen += batch.tokens.size
            rates[name].append(seen / (time.perf_counter() - started))
    local = statistics.median(rates["local disk"])
    print(json.dumps([{"section": f"reader (one epoch, batches of {BATCH}, median of {passes})",
                       "place": name, "tokens_per_s": round(statistics.median(values)),
                       "vs_local": round(statistics.median(values) / local, 3)}
                      for name, values in rates.items()]))


def markdown(rows: list[dict]) -> str:
    return markdown_sections(rows, by="section")


if __name__ == "__main__":
    print(markdown(run()))
