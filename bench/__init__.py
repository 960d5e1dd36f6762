"""Benchmarks that print tables: each module exposes `run(...) -> list[dict]` (rows) and
`markdown(rows) -> str`, and runs alone as `python -m bench.<name>`. `python -m bench`
(`make bench`) runs the CPU ones together and writes bench/results.md."""
