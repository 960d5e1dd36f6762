"""The fault matrix: every stage, every path it reads or writes, every fault a filesystem can
hand it, generated rather than listed by hand.

A case copies a finished run (the `Bench`), damages one path of it, runs the stage's public
command as a real process, and checks the invariant:
  * exit 0, or exit 2 with exactly one `error:` line naming the damaged path (or a file or
    folder on its way), and no traceback;
  * nothing finished is damaged: every file the copy held before, the damaged path aside, is
    byte-identical afterwards, or was rewritten whole by the stage;
  * once the fault is removed (the path restored), rerunning the command ends exactly as an
    uninterrupted run: the same cache bytes, the same student weights, the same metrics.

Processes run as root without CAP_DAC_OVERRIDE (setpriv), so permission bits hold for them as
for any user, and a full disk is a tmpfs mounted over the folder being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tests.reliability.world import ENV, PYTHON, REPO, World, message_lines

FILE_FAULTS = ("missing", "directory", "empty", "truncated", "not_utf8", "unreadable",
               "broken_symlink", "symlink_loop", "fifo")
"""What can happen to a file a stage reads."""
FOLDER_FAULTS = ("missing", "file", "unreadable", "broken_symlink", "symlink_loop")
"""What can happen to a folder a stage reads."""
OUTPUT_FAULTS = ("file", "read_only", "broken_symlink", "symlink_loop", "full_disk")
"""What can happen to a folder a stage writes into."""
FAULTS_OF = {"file": FILE_FAULTS, "folder": FOLDER_FAULTS, "output": OUTPUT_FAULTS}

WITHOUT_DAC = (["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
               if shutil.which("setpriv") and os.geteuid() == 0 else [])
"""Root that permission bits stop: what makes `unreadable` and `read_only` real as root."""
TIMEOUT = 90
CASE_ENV = {**ENV, "OMP_NUM_THREADS": "1"}
"""Seconds a case's process may take; a FIFO that blocks a read would hang past it."""


@dataclass(frozen=True)
class Site:
    """A path a stage reads or writes: `path` relative to the case folder, of `kind` 'file',
    'folder' (read) or 'output' (a folder the stage writes into)."""

    stage: str
    path: str
    kind: str


@dataclass(frozen=True)
class Case:
    site: Site
    fault: str

    @property
    def id(self) -> str:
        return f"{self.site.stage}:{self.site.path}:{self.fault}"


@dataclass(frozen=True)
class Stage:
    """A public command and how its finished result is compared with an uninterrupted run's."""

    name: str
    args: Callable[[Path], list[str]]
    """The command's arguments after `python -m`, for a case folder."""
    result: Callable[[Path], dict]
    """What must equal the uninterrupted run's after the rerun (digests of the outputs)."""
    sites: tuple[Site, ...]
    prepare: Callable[[Path], None] = lambda case: None
    """Makes the bench's copy the stage's starting point (before the fault)."""


def _digests(root: Path, pattern: str = "*") -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.glob(pattern)) if f.is_file()}


def _cache_result(case: Path) -> dict:
    """The cache's files, the manifest compared without timestamps and the teacher's path (each
    case has its own copy of the teacher; its weights fingerprint is compared)."""
    cache = case / "run" / "cache" / "train.zarr"
    digest = {name: sha for name, sha in _digests(cache, "**/*").items()
              if not name.startswith("done/locks/") and name != "zarr.json"}
    manifest = json.loads((cache / "zarr.json").read_text())["attributes"]["manifest"]
    for key in ("created", "completed"):
        manifest.pop(key, None)
    manifest["teacher"].pop("name", None)
    digest["manifest"] = json.dumps(manifest, sort_keys=True)
    return digest


def _student_result(case: Path) -> dict:
    folder = case / "run" / "students" / "s"
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"weights": _digests(folder, "model.safetensors"), "metrics": rows}


def _eval_result(case: Path) -> dict:
    results = json.loads((case / "run" / "reports" / "results.json").read_text())
    return {row["name"]: row.get("lm") for row in results["models"]}


def _tokens_result(case: Path) -> dict:
    from storage.tokens import open_token_store

    return {split: (store.fingerprint, store.tokenizer_fingerprint)
            for split in ("train", "val")
            if (store := open_token_store(case / "run" / "tokens" / f"{split}.zarr"))}


def _verify_result(case: Path) -> dict:
    return {}


TOKENS = "run/tokens/train.zarr"
CACHE = "run/cache/train.zarr"
STAGES = (
    Stage("corpus", lambda case: ["precompute.corpus", f"data.dir={case / 'corpus'}"],
          _tokens_result,
          (Site("corpus", "corpus", "folder"), Site("corpus", "corpus/a.train", "file"),
           Site("corpus", "run/tokens", "output"))),
    Stage("logits", lambda case: ["precompute.logits", f"teacher.model={case / 'teacher'}"],
          _cache_result,
          (Site("logits", f"{TOKENS}/zarr.json", "file"),
           Site("logits", f"{TOKENS}/tokens/c/1/0", "file"),
           Site("logits", "teacher/model.safetensors", "file"),
           Site("logits", "teacher/config.json", "file"),
           Site("logits", "teacher", "folder"),
           Site("logits", "run/cache", "output")),
          prepare=lambda case: shutil.rmtree(case / "run" / "cache")),  # the job from scratch
    Stage("student", lambda case: ["student.train", "distill.run=s"], _student_result,
          (Site("student", f"{TOKENS}/tokens/zarr.json", "file"),
           Site("student", "run/tokens/val.zarr/zarr.json", "file"),
           Site("student", f"{CACHE}/zarr.json", "file"),
           Site("student", f"{CACHE}/logits/zarr.json", "file"),
           Site("student", f"{CACHE}/ids/c/2/0/0", "file"),
           Site("student", f"{CACHE}/lse/c/3/0/0", "file"),
           Site("student", f"{CACHE}/done/c/2", "file"),
           Site("student", CACHE, "folder"),
           Site("student", "run/students/s/checkpoint/trainer_state.pt", "file"),
           Site("student", "run/students", "output"))),
    Stage("evaluate", lambda case: ["student.evaluate"], _eval_result,
          (Site("evaluate", "run/tokens/val.zarr/tokens/c/0/0", "file"),
           Site("evaluate", "run/students/e/model.safetensors", "file"),
           Site("evaluate", "run/students/e/config.json", "file"),
           Site("evaluate", "run/reports", "output"))),
    Stage("verify", lambda case: ["storage", "verify", str(case / CACHE)], _verify_result,
          (Site("verify", f"{CACHE}/ids/zarr.json", "file"),
           Site("verify", f"{CACHE}/logits/c/5/0/0", "file"),
           Site("verify", f"{CACHE}/done/c/5", "file"))),
)
STAGE = {stage.name: stage for stage in STAGES}


def all_cases() -> list[Case]:
    return [Case(site, fault) for stage in STAGES for site in stage.sites
            for fault in FAULTS_OF[site.kind]]


# --------------------------------------------------------------------------------------------
# The finished run every case starts from.

@dataclass(frozen=True)
class Bench:
    """A finished run per stage's needs, and what an uninterrupted run of each stage gives."""

    root: Path
    """Holds `teacher/`, `corpus/` and `run/` (tokens, a clean cache, a finished student `e`)."""
    config: Path
    expected: dict[str, dict]
    """Stage name -> its `result` after an uninterrupted run from the bench."""


def build_bench(world: World, root: Path) -> Bench:
    shutil.copytree(world.teacher, root / "teacher")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.train").write_text("".join(f"the child saw {i} red balls on the floor .\n"
                                            for i in range(200)))
    run = world.new_run(root / "run")
    shutil.copytree(world.clean_cache, run / "cache" / "train.zarr")
    config = root / "tiny.yaml"
    shutil.copy(world.config, config)
    trained = subprocess.run(  # as every case runs: one thread, so the same last bits
        [PYTHON, "-m", "student.train", "--config", str(config), f"run_dir={run}",
         "distill.run=e"], cwd=REPO, env=CASE_ENV, capture_output=True, text=True,
        timeout=TIMEOUT)
    assert trained.returncode == 0, trained.stderr[-2000:]
    # `s`: the same student interrupted after its last checkpoint (its final model not written)
    shutil.copytree(run / "students" / "e", run / "students" / "s")
    for final in ("config.json", "model.safetensors", "generation_config.json"):
        (run / "students" / "s" / final).unlink(missing_ok=True)
    bench = Bench(root=root, config=config, expected={})
    for stage in STAGES:  # each stage once on a clean copy: the uninterrupted results
        with case_folder(bench, root.parent / f"clean-{stage.name}") as case:
            stage.prepare(case)
            result = run_stage(bench, stage, case)
            assert result.returncode == 0, (stage.name, result.stderr[-2000:])
            bench.expected[stage.name] = stage.result(case)
    return bench


@contextlib.contextmanager
def case_folder(bench: Bench, case: Path) -> Iterator[Path]:
    """A fresh copy of the bench (symlinks kept as links), removed afterwards."""
    shutil.copytree(bench.root, case, symlinks=True)
    try:
        yield case
    finally:
        for path in [case, *case.rglob("*")]:  # restore what a fault made unreadable
            if not path.is_symlink() and path.exists():
                path.chmod(0o755 if path.is_dir() else 0o644)
        for mount_point in _mounts_under(case):
            subprocess.run(["umount", "--lazy", mount_point], check=True)
        shutil.rmtree(case, ignore_errors=True)
        aside = case.with_name(case.name + ".aside")
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        elif aside.exists() or aside.is_symlink():
            aside.unlink()


def _mounts_under(folder: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{folder}/")), reverse=True)


def run_stage(bench: Bench, stage: Stage, case: Path) -> subprocess.CompletedProcess:
    args = stage.args(case)
    command = [PYTHON, "-m", args[0]]
    if args[0] != "storage":
        command += ["--config", str(bench.config), f"run_dir={case / 'run'}"]
    command += args[1:]
    return subprocess.run(WITHOUT_DAC + command, cwd=REPO, env=CASE_ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------
# Faults.

def apply(fault: str, path: Path, aside: Path) -> Callable[[], None]:
    """Damage `path`; returns what undoes it: the original, kept at `aside` (outside the case
    folder), is put back unless the stage has replaced the damaged path with one of its own."""
    saved = aside
    existed = path.exists() or path.is_symlink()
    if fault == "full_disk":  # the folder, as it was, on a disk with 64 KiB left
        if existed:
            path.rename(saved)
        path.mkdir(parents=True)
        pages = sum(-(-f.stat().st_size // 4096) for f in saved.rglob("*") if f.is_file()) \
            if existed else 0
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={4 * pages + 64}k",
                                  "tmpfs", str(path)], capture_output=True, text=True)
        if mounted.returncode != 0:
            path.rmdir()
            if existed:
                saved.rename(path)
            raise CannotMount(mounted.stderr)
        if existed:
            shutil.copytree(saved, path, symlinks=True, dirs_exist_ok=True)
        # freeing space: the disk grows in place, keeping what was written on it
        return lambda: subprocess.run(["mount", "-o", "remount,size=256m", str(path)],
                                      check=True)
    if fault in ("unreadable", "read_only"):
        mode = path.stat().st_mode if existed else None
        if not existed:
            path.mkdir(parents=True)
        path.chmod(0o000 if fault == "unreadable" else 0o555)
        return lambda: path.chmod(mode) if mode is not None else path.rmdir()
    if existed:
        path.rename(saved)
    if fault == "directory":
        path.mkdir()
    elif fault == "file":
        path.write_bytes(b"not a folder\n")
    elif fault in ("empty", "truncated", "not_utf8"):
        data = saved.read_bytes()
        path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2],
                          "not_utf8": b"\xff\xfe\xfa" + data[3:]}[fault])
    elif fault == "broken_symlink":
        path.symlink_to(path.with_name(path.name + ".nowhere"))
    elif fault == "symlink_loop":
        path.symlink_to(path.name)
    elif fault == "fifo":
        os.mkfifo(path)
    elif fault != "missing":
        raise ValueError(fault)

    damaged = _signature(path)

    def undo() -> None:
        if _signature(path) != damaged:  # the stage wrote its own: nothing to put back
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if existed:
            saved.rename(path)
    return undo


def _signature(path: Path) -> tuple:
    """What a path is now: its type, size and (files) bytes; the fault applied, or not."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return ("missing",)
    data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
    return (stat.S_IFMT(info.st_mode), info.st_size, hashlib.sha256(data).hexdigest())


class CannotMount(RuntimeError):
    """This machine refuses the tmpfs a full-disk case needs."""


def finished_files(case: Path) -> dict[str, str]:
    """Digests of the finished artifacts a failed command must leave as they were: token
    stores, the cache's done shards, finished models, the corpus."""
    keep = {}
    for root in ("run/tokens", "run/cache", "run/students/e", "corpus", "teacher"):
        folder = case / root
        if folder.is_dir() and not folder.is_symlink():
            with contextlib.suppress(OSError):
                keep.update({f"{root}/{name}": sha for name, sha in _digests(folder, "**/*").items()
                             if "/locks/" not in name})
    return keep


@dataclass(frozen=True)
class Verdict:
    broken: str | None
    """None when the invariant held, else what broke it."""
    seen: str
    """What the user saw: `exit 0`, or the error line (verify: its first problem line)."""


def check_case(bench: Bench, case_dir: Path, case: Case) -> Verdict:
    """Run one case: the damaged run, the check of what it left, the rerun once repaired."""
    stage = STAGE[case.site.stage]
    target = case_dir / case.site.path
    with case_folder(bench, case_dir):
        stage.prepare(case_dir)
        before = finished_files(case_dir)
        undo = apply(case.fault, target, case_dir.with_name(case_dir.name + ".aside"))
        try:
            result = run_stage(bench, stage, case_dir)
        finally:
            undo()
        seen = _seen(result, case_dir, bench)
        broken = _judge(result, case, case_dir)
        if broken:
            return Verdict(broken, seen)
        after = finished_files(case_dir)
        damaged = [name for name, sha in before.items()
                   if not name.startswith(case.site.path) and after.get(name, sha) != sha
                   and not _rewritten_whole(name, case)]
        if damaged:
            return Verdict(f"finished files changed: {damaged[:5]}", seen)
        rerun = run_stage(bench, stage, case_dir)
        if rerun.returncode != 0:
            return Verdict(f"the rerun after the fault failed: {rerun.stderr[-1500:]}", seen)
        if stage.name != "verify" and stage.result(case_dir) != bench.expected[stage.name]:
            return Verdict("the rerun did not end as an uninterrupted run", seen)
    return Verdict(None, seen)


def _seen(result: subprocess.CompletedProcess, case_dir: Path, bench: Bench) -> str:
    if result.returncode == 0:
        return "exit 0"
    errors = [line for line in message_lines(result.stderr) if line.startswith("error:")]
    shown = errors[-1] if errors else (result.stdout.splitlines() or ["(nothing)"])[0]
    return (f"exit {result.returncode}: " + shown.replace(str(case_dir), "CASE")
            .replace(str(bench.config), "tiny.yaml").replace("|", "\\|"))


def render_rows(verdicts: dict[Case, Verdict]) -> list[str]:
    """The record's table rows, one per case, in the matrix's order."""
    return [f"| {case.site.stage} | `{case.site.path}` | {case.fault} | {verdict.seen} |"
            for case, verdict in verdicts.items()]


def _rewritten_whole(name: str, case: Case) -> bool:
    """A finished file a stage may legitimately replace: the logits job rewriting a shard it
    found damaged, or the corpus stage rebuilding the token stores it owns."""
    return case.site.stage in ("corpus",) and name.startswith("run/tokens")


def _judge(result: subprocess.CompletedProcess, case: Case, case_dir: Path) -> str | None:
    where = f"exit {result.returncode}; stderr: {result.stderr[-1500:]}"
    if "Traceback" in result.stderr:
        return f"traceback: {where}"
    if result.returncode == 0:
        return None
    if result.returncode != 2:
        return f"exit code: {where}"
    lines = message_lines(result.stderr)
    if case.site.stage == "verify" and not lines[-1:][0].startswith("error:"):
        # a problem per line on stdout, naming the file or shard, and a count on stderr
        named = _names_the_site(result.stdout, case, case_dir)
        return None if named else f"verify did not name the damage: {result.stdout[-1500:]}"
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) != 1 or errors != lines[-1:]:
        return f"not one error line: {where}"
    if not _names_the_site(errors[0], case, case_dir):
        return f"the error does not name {case.site.path}: {errors[0]}"
    return None


def _names_the_site(text: str, case: Case, case_dir: Path) -> bool:
    """Whether `text` names the damaged path or a file or folder on its way to it (below the
    case folder), or the shard it belongs to."""
    parts = Path(case.site.path).parts
    names = [str(Path(*parts[i:])) for i in range(len(parts))]  # a/b/c, b/c, c
    names += [str(case_dir / Path(*parts[:i])) for i in range(1, len(parts) + 1)
              if parts[:i] != ("run",)]  # the run folder alone names nothing in particular
    if "/c/" in case.site.path:  # a shard file: "shard N"
        names.append(f"shard {case.site.path.split('/c/')[1].split('/')[0]}")
    return any(name in text for name in names)
