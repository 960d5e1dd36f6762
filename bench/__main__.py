"""`make bench` (`python -m bench`): the eight CPU benchmarks in one run, one summary of their
headline figures against the project's targets, and bench/results.md.

    python -m bench [--only cache,student] [--teacher DIR --tokens STORE] [--out FILE]
                    [--cache-sequences 256] [--job-sequences 128] [--student-steps 200]
                    [--pairs 10000] ...

Benchmarks (each in a fresh process, one after another, so that none inherits another's
threads, allocator or page cache): `bench.cache` (bytes/token and read/write speed of the logit
cache on a real trained teacher), `bench.teacher_job` (the logits job against the teacher's bare
compute), `bench.student` (CE vs cached vs online KD: speed, memory, quality), `bench.real_text`
(top-k and sampled caches vs online KD, quality on BabyLM text; the longest), `bench.draws`
(the counted-draws cache the configs ship: bytes/token, and its students against online KD at
T = 1 and 2 on both languages, three seeds each), `bench.ensemble`
(two teachers' caches mixed, LLaMA students, against the online ensembles), `bench.remote`
(a cache in a local S3 server against local disk: reading, and training with 20 ms added to
every request), `bench.evaluate` (minimal pairs/s). `bench.gpu_check` needs a GPU and is not run here (bench/gpu_results.md).

bench.cache needs a trained teacher: without --teacher/--tokens and without runs/demo/teacher,
the demo's data and teacher stages run first (`precompute.corpus` and `precompute.teacher` on
configs/demo.yaml, once). On a shared machine throughputs are noisy;
the ratios, measured side by side within one benchmark, are the figures that count.

results.md holds the machine (cores, CPU model, torch, date, load average), the summary table,
then every benchmark's full tables; it is written when all have run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

from bench import cache, draws, ensemble, evaluate, real_text, remote, student, teacher_job
from bench.tables import markdown_table
from configs import CONFIG_DIR, UserError, load_config
from configs.cli import reproducible_cpu_math

BENCHES = {"cache": cache, "teacher_job": teacher_job, "student": student,
           "real_text": real_text, "draws": draws, "ensemble": ensemble, "remote": remote,
           "evaluate": evaluate}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).with_name("results.md")
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
TEACHER_DONE = "teacher.json"  # precompute.teacher writes it last: the teacher is finished
READ_K, JOB_K = 32, 64  # the k of the cache's read table and of the teacher job's cache


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    reproducible_cpu_math()  # as the CLI runs; the benchmarks' processes inherit it
    only = [name for name in args.only.split(",") if name] if args.only else list(BENCHES)
    unknown = set(only) - set(BENCHES)
    if unknown:
        raise UserError(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(BENCHES)})")
    facts = machine_facts()
    print(f"bench: {', '.join(only)} on {facts['cores']} cores, load average {facts['load average']}")
    if "cache" in only:
        ensure_teacher(args.teacher, args.tokens)
        facts["bench.cache teacher"] = teacher_facts(args.teacher)
    kwargs = {
        "cache": dict(teacher=args.teacher, tokens=args.tokens, sequences=args.cache_sequences,
                      read_k=READ_K),
        "teacher_job": dict(n_sequences=args.job_sequences, k=JOB_K),
        "student": dict(steps=args.student_steps, speed_steps=args.speed_steps,
                        teacher_steps=args.teacher_steps),
        "real_text": {},
        "draws": {},
        "ensemble": {},
        "remote": {},
        "evaluate": dict(n_pairs=args.pairs),
    }
    results, seconds, errors = {}, {}, {}
    for name in only:
        print(f"\n== bench.{name} ==", flush=True)
        started = time.perf_counter()
        try:
            results[name] = run_isolated(BENCHES[name].run, **kwargs[name])
            print(BENCHES[name].markdown(results[name]), flush=True)
        except Exception as exc:  # noqa: BLE001 -- one failed bench must not lose the others
            traceback.print_exc()
            last_line = (str(exc).strip().splitlines() or [""])[-1]  # a subprocess's stderr tail
            errors[name] = f"{type(exc).__name__}: {last_line}"
        seconds[name] = time.perf_counter() - started
    facts["load average at end"] = _load_average()
    rows = summary(results, errors)
    print("\n== summary ==\n" + markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(report(facts, rows, results, seconds, errors, argv=sys.argv[1:] if argv is None
                          else argv))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 1 if errors else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="",
                        help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    parser.add_argument("--teacher", type=Path, default=cache.DEFAULT_TEACHER,
                        help="trained teacher (HF model dir) for bench.cache")
    parser.add_argument("--tokens", type=Path, default=cache.DEFAULT_TOKENS,
                        help="token store the teacher was trained on, for bench.cache")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report")
    parser.add_argument("--cache-sequences", type=int, default=256,
                        help="bench.cache: sequences run through the teacher")
    parser.add_argument("--job-sequences", type=int, default=128,
                        help="bench.teacher_job: sequences per measurement")
    parser.add_argument("--student-steps", type=int, default=200,
                        help="bench.student: steps of each quality run")
    parser.add_argument("--speed-steps", type=int, default=40,
                        help="bench.student: steps of each speed run")
    parser.add_argument("--teacher-steps", type=int, default=400,
                        help="bench.student: steps of its synthetic teacher")
    parser.add_argument("--pairs", type=int, default=10_000, help="bench.evaluate: minimal pairs")
    return parser.parse_args(argv)


def run_isolated(function, **kwargs) -> list[dict]:
    """`function(**kwargs)` in a fresh spawned process (its own threads, memory and imports)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, **kwargs).result()


def ensure_teacher(teacher: Path, tokens: Path) -> None:
    """The demo teacher that bench.cache measures: run the demo's data and teacher stages when
    the default paths lack them (resuming an interrupted teacher); refuse other missing paths."""
    defaults = (teacher, tokens) == (cache.DEFAULT_TEACHER, cache.DEFAULT_TOKENS)
    if not defaults:
        if not (teacher / "config.json").is_file():
            raise UserError(f"--teacher {teacher}: no trained model there (no config.json)")
        if not (tokens / "zarr.json").is_file():
            raise UserError(f"--tokens {tokens}: no token store there")
        return
    run_dir = teacher.parent
    stages = [("precompute.corpus", not (tokens / "zarr.json").is_file()),
              ("precompute.teacher", not (teacher / TEACHER_DONE).is_file())]
    for module, needed in stages:
        if needed:
            command = [sys.executable, "-m", module, "--config", str(DEMO_CONFIG),
                       f"run_dir={run_dir}"]
            print(f"bench.cache needs a trained teacher and {run_dir} lacks it: running "
                  f"`{' '.join(command[1:])}` first", flush=True)
            subprocess.run(command, check=True)


def teacher_facts(teacher: Path) -> str:
    """The measured teacher in a line: its path, shape and (from teacher.json) validation."""
    config = json.loads(_read(str(teacher / "config.json")) or "{}")
    info = json.loads(_read(str(teacher / TEACHER_DONE)) or "{}")
    shape = f"{config.get('n_layer', '?')}x{config.get('n_embd', '?')}, vocab " \
            f"{config.get('vocab_size', '?')}"
    val = info.get("val", {})
    trained = f"; {info['method']}, val ppl {val['perplexity']:.2f}" if "perplexity" in val else ""
    return f"{teacher} ({shape}{trained})"


def machine_facts() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
            "cpu": cpu,
            "memory": _meminfo_gib(),
            "python": platform.python_version(),
            "torch": f"{torch.__version__} ({torch.get_num_threads()} threads by default)",
            "MKL_CBWR": os.environ.get("MKL_CBWR", "unset (MKL's default)"),
            "commit": _git_commit(),
            "load average": _load_average()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _meminfo_gib() -> str:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" + uncommitted changes" if dirty else "")


# -- the summary --------------------------------------------------------------------------------

def summary(results: dict[str, list[dict]], errors: dict[str, str] | None = None) -> list[dict]:
    """Headline rows {figure, measured, target, met} from the benches' rows (keyed by bench name);
    a bench that did not run or failed gives one row saying so."""
    errors = errors or {}
    rows: list[dict] = []
    for name, figures in (("cache", _cache_figures), ("teacher_job", _job_figures),
                          ("student", _student_figures), ("real_text", _real_text_figures),
                          ("draws", _draws_figures), ("ensemble", _ensemble_figures),
                          ("remote", _remote_figures), ("evaluate", _evaluate_figures)):
        if name in results:
            try:
                rows += figures(results[name], results)
            except (KeyError, StopIteration, ZeroDivisionError) as exc:  # rows of another shape
                rows.append({"figure": f"bench.{name}", "measured": f"no summary: {exc!r}",
                             "target": "", "met": ""})
        else:
            rows.append({"figure": f"bench.{name}", "measured": errors.get(name, "not run"),
                         "target": "", "met": "failed" if name in errors else ""})
    return rows


def _row(figure: str, measured: str, target: str = "", met: bool | None = None) -> dict:
    return {"figure": figure, "measured": measured, "target": target,
            "met": "" if met is None else "met" if met else "NOT met"}


def _vs_online(figure: str, kd_ppl: float, online_ppl: float) -> dict:
    """The quality target's row: a KD student's val perplexity within 1 % of online KD's."""
    gap = 100 * (kd_ppl / online_ppl - 1)
    return _row(figure, f"{gap:+.2f} % ({kd_ppl:.3f} vs {online_ppl:.3f})", "within 1 %",
                abs(gap) <= 1)


def _n(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cache_figures(rows: list[dict], _results) -> list[dict]:
    """The size target holds for the value code the configs choose (cache.value_code)."""
    chosen = load_config(DEMO_CONFIG).cache.value_code
    sizes = [r for r in rows if r["table"] == "size"]
    out = []
    for code in dict.fromkeys(r["value_code"] for r in sizes):
        per_k = {r["k"]: r["B/token"] for r in sizes if r["value_code"] == code}
        at_read_k = per_k.get(READ_K)
        applies = code == chosen and at_read_k is not None
        out.append(_row(f"cache bytes/token at k = {' / '.join(map(str, per_k))}, {code}"
                        + (" (the configs' value_code)" if code == chosen else ""),
                        " / ".join(f"{v:.1f}" for v in per_k.values()),
                        f"<= 64 at k = {READ_K}" if applies else "",
                        at_read_k <= 64 if applies else None))
    reads = [r for r in rows if r["table"] == "read"]
    for code in dict.fromkeys(r["value_code"] for r in reads):
        speed = {r["read"]: r["tok/s"] for r in reads if r["value_code"] == code}
        k = next(r["k"] for r in reads if r["value_code"] == code)
        out.append(_row(f"reader tokens/s, shuffled stream (k = {k}, {code}, one thread)",
                        f"{_n(speed['shuffled stream'])} (contiguous "
                        f"{_n(speed['contiguous'])}, random single-seq "
                        f"{_n(speed['random single-seq'])})",
                        ">= 250,000", speed["shuffled stream"] >= 250_000))
    return out


def _job_figures(rows: list[dict], results) -> list[dict]:
    by = {r["measurement"]: r for r in rows}
    job = by["job"]
    out = []
    sizes = [r for r in results.get("cache", []) if r["table"] == "size"]
    write = next((r for r in sizes if r["k"] == JOB_K and r["value_code"] == "float16"), None)
    if write:
        ratio = write["write tok/s"] / job["tokens_per_s"]
        out.append(_row(f"cache write tokens/s (k = {JOB_K}, float16) / teacher job tokens/s",
                        f"{ratio:.1f} x ({_n(write['write tok/s'])} vs {_n(job['tokens_per_s'])})",
                        ">= 5 x", ratio >= 5))
    alternating = by["job, alternating in one process"]["vs_topk_lse"]
    out.append(_row("teacher job tokens/s / (forward + top-k + lse)",
                    f"{alternating:.3f} (in one process; separate processes: "
                    f"{job['vs_topk_lse']:.3f}, {_n(job['tokens_per_s'])} vs "
                    f"{_n(by['forward+topk+lse']['tokens_per_s'])}; {job['teacher']})",
                    ">= 0.95", alternating >= 0.95))
    out.append(_row("teacher job tokens/s / bare forward",
                    f"{job['vs_forward']:.3f} (forward {_n(by['forward']['tokens_per_s'])})"))
    out.append(_row("teacher job peak RSS MB (forward / forward+topk+lse / job)",
                    " / ".join(_n(by[kind]["peak_rss_mb"]) for kind in teacher_job.KINDS)))
    return out


def _student_figures(rows: list[dict], _results) -> list[dict]:
    speed = {(r["student"], r["run"]): r for r in rows if r["section"] == "speed"}
    loop = {(r["student"], r["run"]): r for r in rows if r["section"].startswith("loop")}
    step = {r["run"]: r for r in rows if r["section"].startswith("step")}
    ppl = {r["run"]: r["val_ppl"] for r in rows if r["section"] == "quality"}
    tiny, small = student.shape_name(student.STUDENT), student.shape_name(student.SMALL_STUDENT)
    kd, drawn, more = student.CACHED_KD, student.SAMPLED_KD, student.MORE_SAMPLED_KD
    ce, cached, float16, sampled, more_sampled, online = (
        speed[tiny, name] for name in ("CE baseline", kd, student.FLOAT16_KD, drawn, more,
                                       "online KD (T=2)"))
    small_ce, small_cached = (speed[small, name] for name in ("CE baseline", kd))
    draws = (sampled, more_sampled)

    def faster(shape: str, run: str, what: str, base: dict, extra: str = "") -> dict:
        """The loop row's median ratio (the verdict's) and range, then the separate runs'."""
        row, separate = loop[shape, run], speed[shape, run]
        return _row(f"{what} tokens/s / CE tokens/s (training step with reading, {shape} student)",
                    f"{row['vs_ce']:.3f} (median of {row['processes']} processes, "
                    f"{row['vs_ce_range']}; separate runs: {separate['vs_ce']:.3f}, "
                    f"{_n(separate['tokens_per_s'])} vs {_n(base['tokens_per_s'])}{extra})",
                    ">= 0.95", row["vs_ce"] >= 0.95)

    def of_draws(what: str, ratio: str, megabytes: str, *, digits: int) -> dict:
        """One memory figure of KD from 64 and from 128 draws, met when both are."""
        return _row(f"{what}, KD from 64 / 128 draws / CE ({tiny} student)",
                    " / ".join(f"{row[ratio]:.{digits}f}" for row in draws)
                    + " (" + " / ".join(f"{row[megabytes]:.1f}" for row in draws) + " MB)",
                    "<= 1.1", all(row[ratio] <= 1.1 for row in draws))

    out = [
        faster(small, kd, "cached KD", small_ce),
        faster(tiny, kd, "cached KD", ce, f"; without reading: {step[kd]['vs_ce']:.3f}"),
        faster(tiny, drawn, "KD from 64 draws", ce),
        faster(tiny, more, "KD from 128 draws", ce),
        _row(f"cached KD speed-up over online KD (training loop, {tiny} student)",
             f"{cached['tokens_per_s'] / online['tokens_per_s']:.2f} x "
             f"(online {_n(online['tokens_per_s'])} tokens/s)"),
        _row(f"peak RSS of the training process, cached KD / CE ({tiny} student)",
             f"{cached['process_rss_vs_ce']:.3f} ({cached['process_peak_rss_mb']:.1f} vs "
             f"{ce['process_peak_rss_mb']:.1f} MB; float16 cache {float16['process_rss_vs_ce']:.3f};"
             f" online KD {online['process_rss_vs_ce']:.3f})",
             "<= 1.1", cached["process_rss_vs_ce"] <= 1.1),
        of_draws("peak RSS of the training process", "process_rss_vs_ce", "process_peak_rss_mb",
                 digits=3),
        _row(f"peak RSS growth, cached KD / CE ({small} student)",
             f"{small_cached['rss_vs_ce']:.2f} ({small_cached['peak_rss_mb']:.1f} vs "
             f"{small_ce['peak_rss_mb']:.1f} MB)", "<= 1.1", small_cached["rss_vs_ce"] <= 1.1),
        _row(f"peak RSS growth, cached KD / CE ({tiny} student)",
             f"{cached['rss_vs_ce']:.2f} ({cached['peak_rss_mb']:.1f} vs {ce['peak_rss_mb']:.1f} MB;"
             f" float16 cache {float16['rss_vs_ce']:.2f}; online KD {online['rss_vs_ce']:.2f})",
             "<= 1.1", cached["rss_vs_ce"] <= 1.1),
        of_draws("peak RSS growth", "rss_vs_ce", "peak_rss_mb", digits=2),
    ]
    for run, label in (("cached KD k=64", "cached KD (k=64, T={t})"),
                       ("sampled KD m=64", "KD from 64 sampled entries (T={t})")):
        out += [_vs_online(f"val perplexity, {label.format(t=t)} vs online KD (T={t})",
                           ppl[f"{run} T={t}"], ppl[f"online KD T={t}"]) for t in (1, 2)]
    out.append(_vs_online("val perplexity, KD from 128 sampled entries (T=2) vs online KD (T=2)",
                          ppl["sampled KD m=128 T=2"], ppl["online KD T=2"]))
    ce_ppl = ppl["CE baseline"]
    out.append(_row("val perplexity vs CE baseline (T=2)",
                    f"cached {100 * (ppl['cached KD k=64 T=2'] / ce_ppl - 1):+.2f} %, online "
                    f"{100 * (ppl['online KD T=2'] / ce_ppl - 1):+.2f} % (CE {ce_ppl:.3f})"))
    return out


def _real_text_figures(rows: list[dict], _results) -> list[dict]:
    """The quality target again, on BabyLM text with a teacher trained there: for the top-k
    cache and for the cache of sampled entries."""
    ppl = {r["run"]: r["val_ppl"] for r in rows if r["section"] == "quality"}
    teacher = next(r for r in rows if r["section"] == "teacher")
    size = {r["cache"]: r["bytes_per_token"] for r in rows if r["section"] == "caches"}
    k, m = real_text.K, real_text.SAMPLES
    out = [_row(f"BabyLM text: teacher head mass at k = {k}, T = 1 / T = 2",
                f"{teacher['head_mass_T=1']:.3f} / {teacher['head_mass_T=2']:.3f} (teacher val ppl "
                f"{teacher['val_ppl']:.2f}, {_n(teacher['train_tokens'])} training tokens)")]
    more, at_2 = real_text.MORE_SAMPLES, (real_text.SAMPLE_TEMPERATURE,)
    for prefix, label, temperatures in (
            (f"cached KD k={k}", f"top-{k} cache", real_text.TEMPERATURES),
            (f"sampled KD m={m}", f"{m} sampled entries", real_text.TEMPERATURES),
            (f"sampled KD m={more}", f"{more} sampled entries", at_2)):
        out += [_vs_online(f"BabyLM text: val perplexity, KD from {label} vs online KD (T={t:g})",
                           ppl[f"{prefix} T={t:g}"], ppl[f"online KD T={t:g}"])
                for t in temperatures]
    ce_ppl = ppl["CE baseline"]

    def vs_ce(prefix: str, temperatures: tuple[float, ...] = real_text.TEMPERATURES) -> str:
        return " / ".join(f"{100 * (ppl[f'{prefix} T={t:g}'] / ce_ppl - 1):+.2f}"
                          for t in temperatures)

    out.append(_row("BabyLM text: val perplexity vs CE baseline (T=1 / T=2)",
                    f"top-{k} {vs_ce(f'cached KD k={k}')} %; sampled {vs_ce(f'sampled KD m={m}')} %"
                    f" (T=2 from {more}: {vs_ce(f'sampled KD m={more}', at_2)} %);"
                    f" online {vs_ce('online KD')} % (CE {ce_ppl:.3f})"))
    loop = {r["run"]: r for r in rows if r["section"].startswith("loop")}
    for name, label in ((real_text.CACHED_KD, f"top-{k} cache"),
                        (real_text.SAMPLED_KD, f"{m} sampled entries"),
                        (real_text.MORE_SAMPLED_KD, f"{more} sampled entries")):
        out.append(_loop_row(f"BabyLM text: KD from {label} tokens/s / CE tokens/s (training "
                             f"step with reading, {loop[name]['student']} student, vocab "
                             f"{real_text.VOCAB})", loop, name))
    out.append(_row("BabyLM text: cache bytes/token", "; ".join(
        f"{name} {value:.1f}" for name, value in size.items())))
    return out


def _draws_figures(rows: list[dict], _results) -> list[dict]:
    """The cache the configs ship: one row per language and temperature holding its bytes per
    token (BabyLM text) and its students' gap to online KD (the median of the seeds'), judged
    on both; then its training step's speed and memory against CE."""
    size = next(r["bytes_per_token"] for r in rows if r["section"] == "caches")
    out = []
    for row in (r for r in rows if r["section"] == "quality"):
        gap = row["vs_online_%"]
        out.append(_row(f"{row['language']}: {draws.NAME}, T = {row['T']:g}: bytes/token on "
                        "BabyLM text; val perplexity vs online KD (median of "
                        f"{row['seeds']} seeds)",
                        f"{size:.1f} B; {gap:+.2f} % ({row['draws_val_ppl']:.3f} vs "
                        f"{row['online_val_ppl']:.3f}; seeds {row['per_seed_gap_%']})",
                        "<= 64 B, within 1 %", size <= 64 and abs(gap) <= 1))
    loop = {r["run"]: r for r in rows if r["section"].startswith("loop")}
    memory = {r["run"]: r for r in rows if r["section"].startswith("memory")}
    for name in list(loop)[1:]:  # the first is CE
        out.append(_loop_row(f"BabyLM text: {name} tokens/s / CE tokens/s (training step with "
                             f"reading, {loop[name]['student']} student)", loop, name))
        out.append(_rss_row(f"BabyLM text: {name} peak RSS / CE (whole process)", memory, name))
    return out


def _loop_row(figure: str, loop: dict[str, dict], name: str) -> dict:
    """The speed target's row: a loop row's tokens/s against CE's (the first of `loop`)."""
    row, ce = loop[name], next(iter(loop.values()))
    return _row(figure, f"{row['vs_ce']:.3f} (median of {row['processes']} processes, "
                        f"{row['vs_ce_range']}; {_n(row['tokens_per_s'])} vs "
                        f"{_n(ce['tokens_per_s'])})", ">= 0.95", row["vs_ce"] >= 0.95)


def _rss_row(figure: str, memory: dict[str, dict], name: str) -> dict:
    """The memory target's row: a training process's peak RSS against CE's (the first)."""
    row, ce = memory[name], next(iter(memory.values()))
    return _row(figure, f"{row['rss_vs_ce']:.3f} ({row['process_peak_rss_mb']:.1f} vs "
                        f"{ce['process_peak_rss_mb']:.1f} MB)", "<= 1.1", row["rss_vs_ce"] <= 1.1)


def _ensemble_figures(rows: list[dict], _results) -> list[dict]:
    """Ensembles of cached teachers (LLaMA students): the cached ensemble against the online
    probability mixture, the logit average beside it, whether the ensemble beats the best single
    teacher, and the LLaMA student's loop speed and memory against CE."""
    students = {r["run"]: r for r in rows if r["section"].startswith("students")}
    online = students["online ensemble, probability mixture"]
    cached = students[ensemble.ENSEMBLE]
    weighted = [r for name, r in students.items() if name.startswith("cached ensemble, weights")]
    best_weighted = min([cached, *weighted], key=lambda r: r["val_ppl"])
    best_single = min((students[f"cached KD, {name} (64 draws)"] for name in ensemble.TEACHERS),
                      key=lambda r: r["val_ppl"])
    logit_average = students["online ensemble, logit average"]
    out = [_vs_online("BabyLM text, LLaMA student: val perplexity, cached ensemble (2 x 64 draws, "
                      "equal weights) vs online probability-mixture ensemble",
                      cached["val_ppl"], online["val_ppl"]),
           _row("BabyLM text, LLaMA student: online logit-average ensemble vs online probability "
                "mixture", f"{logit_average['vs_online_mixture_%']:+.2f} % (val ppl "
                f"{logit_average['val_ppl']:.3f} vs {online['val_ppl']:.3f}; BLiMP "
                f"{logit_average['blimp_%']:.2f} vs {online['blimp_%']:.2f} %)"),
           _row(f"BabyLM text, LLaMA student: ensemble of two top-{ensemble.TOPK} caches vs "
                "online probability mixture (what the heads miss)",
                f"{students[ensemble.TOPK_ENSEMBLE]['vs_online_mixture_%']:+.2f} % val ppl; "
                + "; ".join(f"T = {r['T']:g}: {r['mass_in_a_tail_%']:.2f} % of the mixture in a "
                            f"tail bucket, KL {r['kl_nats_per_token']:.4f} nats/token"
                            for r in rows if r["section"].startswith("top-"))),
           _row("BabyLM text, LLaMA student: best cached ensemble vs best single cached teacher "
                "(a finding)", f"{best_weighted['run']} {best_weighted['val_ppl']:.3f} vs "
                f"{best_single['run']} {best_single['val_ppl']:.3f} "
                f"({100 * (best_weighted['val_ppl'] / best_single['val_ppl'] - 1):+.2f} %; BLiMP "
                f"{best_weighted['blimp_%']:.2f} vs {best_single['blimp_%']:.2f} %; CE "
                f"{students[ensemble.CE]['val_ppl']:.3f})")]
    loop = {r["run"]: r for r in rows if r["section"].startswith("loop")}
    out += [_loop_row(f"BabyLM text: LLaMA {loop[name]['student']} {name} tokens/s / CE tokens/s "
                      "(training step with reading)", loop, name)
            for name in (ensemble.SINGLE, ensemble.ENSEMBLE)]
    memory = {r["run"]: r for r in rows if r["section"].startswith("memory")}
    out += [_rss_row(f"BabyLM text: LLaMA student {name} peak RSS / CE (whole process)", memory,
                     name) for name in (ensemble.SINGLE, ensemble.ENSEMBLE)]
    return out


def _remote_figures(rows: list[dict], _results) -> list[dict]:
    """A cache in object storage: the reader's tokens/s from the local S3 server against local
    disk (no target: it measures that server), and the training step against CE from each place
    for each student, judged against the speed target."""
    reader = {r["place"]: r for r in rows if r["section"].startswith("reader")}
    out = [_row(f"reader tokens/s from {place} / local disk (moto's S3 server on this machine)",
                f"{row['vs_local']:.3f} ({_n(row['tokens_per_s'])} vs "
                f"{_n(reader['local disk']['tokens_per_s'])})")
           for place, row in reader.items() if place != "local disk"]
    loops: dict[str, dict[str, dict]] = {}
    for row in (r for r in rows if r["section"].startswith("loop")):
        loops.setdefault(row["student"], {})[row["run"]] = row
    for shape, loop in loops.items():
        for name in list(loop)[1:]:  # the first is CE
            out.append(_loop_row(f"{name}: tokens/s / CE tokens/s (training step with reading, "
                                 f"{shape} student)", loop, name))
    return out


def _evaluate_figures(rows: list[dict], _results) -> list[dict]:
    def seconds_for_10k(row: dict) -> float:
        return 10_000 / row["pairs_per_s"]

    best = max(rows, key=lambda r: r["pairs_per_s"])
    default = next(r for r in rows  # torch's default threads at the default eval.batch_size
                   if (r["threads"], r["batch_size"]) == evaluate.DEFAULT_SETTINGS[-1])
    shown = ((default, ", torch default"),) if best is default else (
        (default, ", torch default"), (best, ", fastest"))
    return [_row(f"minimal pairs/s ({r['threads']} thread{'s' * (r['threads'] > 1)}, batch "
                 f"{r['batch_size']}{label})",
                 f"{_n(r['pairs_per_s'])} (10,000 pairs in {seconds_for_10k(r):.0f} s; "
                 f"{_n(r['pairs'])} measured)",
                 "10,000 pairs < 60 s", seconds_for_10k(r) < 60)
            for r, label in shown]


def report(facts: dict, rows: list[dict], results: dict[str, list[dict]],
           seconds: dict[str, float], errors: dict[str, str], *, argv: list[str]) -> str:
    """results.md: machine facts, the summary, then every bench's full tables."""
    command = "python -m bench" + "".join(f" {arg}" for arg in argv)
    parts = [
        "# Benchmark results (`make bench`)",
        f"Generated by `{command}`; CPU benchmarks, each in a fresh process, one after another. "
        "The machine may be shared: absolute throughputs are noisy, the ratios (measured side by "
        "side within one benchmark) are the figures that count. GPU figures: "
        "[gpu_results.md](gpu_results.md).",
        markdown_table([{"machine": key, "value": value} for key, value in facts.items()]),
        "## Summary",
        markdown_table(rows),
    ]
    for name, module in BENCHES.items():
        if name not in results and name not in errors:
            continue
        parts.append(f"## bench.{name} ({seconds[name]:.0f} s)")
        parts.append((module.__doc__ or "").strip().split("\n\n")[0])
        parts.append(f"FAILED: {errors[name]}" if name in errors
                     else module.markdown(results[name]))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    from configs.cli import exit_on_user_error

    exit_on_user_error(lambda: sys.exit(main()))
