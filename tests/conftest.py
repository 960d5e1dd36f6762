"""Shared fixtures. Real data is read in place from ../shared/data (or $BABYLM_KD_SHARED_DATA)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BABYLM_KD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data folder; tests that need it fail loudly if it is absent."""
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA} (set BABYLM_KD_SHARED_DATA)"
    return SHARED_DATA


def pytest_sessionstart(session) -> None:
    """Print one line on the CPU and thread settings the numerics run on (under -q too): what to
    compare when floating-point results differ between machines. Un-ignore SIGINT: a pytest
    started with `&` from a script ignores it, every child would inherit that, and the Ctrl-C
    tests would see jobs that cannot be interrupted. The in-process numerics get the same MKL
    rounding mode as the jobs the tests start (configs.cli.reproducible_cpu_math)."""
    import platform
    import signal

    import torch

    from configs.cli import reproducible_cpu_math

    reproducible_cpu_math()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"cpu: {names[0] if names else platform.processor()} ({os.cpu_count()} logical), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ['MKL_CBWR']}")


@pytest.fixture(scope="session")
def s3():
    """A local S3 server (moto, in this process, so it outlives the jobs it serves) behind a TCP
    proxy that can add latency and cut connections (bench.objectstore). One for the session:
    tests use their own prefixes in its bucket, and restore the proxy when they change it."""
    from bench.objectstore import object_store

    with object_store() as store:
        yield store


@pytest.fixture
def s3_env(s3, monkeypatch):
    """`s3`, with its endpoint and made-up credentials in this process's environment, as a user
    would set them; the proxy restored afterwards."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    yield s3
    s3.proxy.restore()
    s3.proxy.latency = 0.0
