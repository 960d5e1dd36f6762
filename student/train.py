"""Train a student: `python -m student.train` (`make distill`, `make baseline`).

The student's modes, all through the one loop of training/loop.py: the CE baseline
(distill.alpha = 1, no cache opened), cached KD (the teacher's entries from the logit cache; no
teacher in memory) and online KD (the teacher resident, full-vocabulary KL: the reference the
cached mode is measured against). Either mode takes one teacher or an ensemble
(`distill.teachers`): several caches of one token store mixed into one target, or several
resident teachers.

Output, `<run>/students/<name>/`: the final model, config.yaml, metrics.jsonl and checkpoint/
(see training/loop.py). Rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from configs import Config, EnsembleMember, UserError
from configs.cli import run
from storage.cache import LogitCache, open_cache, read_manifest
from storage.location import Remote, file_exists, is_url, locate
from storage.tokens import TokenStore
from training.checkpoint import is_finished
from training.device import resolve_device
from training.loop import Distillation, fit, open_tokens
from training.losses import same_temperature
from training.models import load_teacher, new_model_of, resolve_teacher


def run_name(cfg: Config) -> str:
    """distill.run, or derived: 'baseline' (alpha = 1), 'kd-a0.5-T2-k32' (top-32),
    'kd-a0.5-T2-s64' (64 draws), 'online-a0.5-T2'; a named teacher adds '-<name>', an ensemble
    '-mix-gpt2_0.5-llama_0.5' (its target and normalised weights; 'logitavg' for the
    logit average). Give it a config `as_cached` resolved, so the name says what the cache holds
    rather than what the config asked for."""
    d = cfg.distill
    if d.run:
        return d.run
    if d.alpha == 1:
        return "baseline"
    members = teachers_of(cfg)
    if len(members) > 1:
        target = "mix" if d.ensemble == "probability" else "logitavg"
        suffix = f"-{target}-" + "-".join(f"{m.label}_{w:.3g}"
                                          for m, w in zip(members, weights_of(members)))
    else:
        suffix = f"-{members[0].label}" if members[0].label else ""
    if d.mode == "online":
        return f"online-a{d.alpha:g}-T{d.temperature:g}{suffix}"
    if len(members) > 1:
        return f"kd-a{d.alpha:g}-T{d.temperature:g}{suffix}"
    c = cfg.cache
    if c.selection == "draws":  # the draws this student reads: those at its temperature
        at_t = [m for t, m in zip(c.temperatures, c.draws_per_temperature)
                if same_temperature(t, d.temperature)]
        return f"kd-a{d.alpha:g}-T{d.temperature:g}-d{at_t[0] if at_t else c.k}{suffix}"
    letter = "s" if c.selection == "sample" else "k"
    return f"kd-a{d.alpha:g}-T{d.temperature:g}-{letter}{d.k or c.k}{suffix}"


def teachers_of(cfg: Config) -> tuple[EnsembleMember, ...]:
    """The teachers a student distils from: `distill.teachers`; else the only entry of
    `teachers:`; else the config's own teacher (a member naming no teacher and no cache)."""
    if cfg.distill.teachers:
        return cfg.distill.teachers
    if len(cfg.teachers) == 1:
        return (EnsembleMember(teacher=next(iter(cfg.teachers))),)
    if cfg.teachers:
        raise UserError(f"the config has {len(cfg.teachers)} teachers ({', '.join(cfg.teachers)})"
                        ": say which to distil from, e.g. distill.teachers=[" +
                        ", ".join(cfg.teachers) + "]")
    return (EnsembleMember(),)


def weights_of(members: tuple[EnsembleMember, ...]) -> tuple[float, ...]:
    """The members' weights normalised to sum to 1."""
    total = sum(member.weight for member in members)
    return tuple(member.weight / total for member in members)


def cache_path(cfg: Config, member: EnsembleMember | None = None) -> Path | Remote:
    """The train cache of `member` (default: the student's only teacher): a folder, or in
    object storage (`storage.caches`, or a member's cache URL)."""
    member = member or teachers_of(cfg)[0]
    where = member.cache if member.cache else teacher_config(cfg, member).cache_at("train")
    return locate(where if is_url(where) else Path(where).expanduser(), cfg.storage.options)


def as_cached(cfg: Config) -> Config:
    """`cfg` with its cache section as the run's cache records it (k, selection, draws' temperature
    and seed, value code, stored temperatures) when the student distils from that cache: its name,
    config.yaml and model card then say what it read. Unchanged for the CE baseline, online KD,
    an ensemble (its caches may differ; the card lists each), or before the cache exists
    (training then says to make it)."""
    if cfg.distill.alpha == 1 or cfg.distill.mode != "cached" or len(teachers_of(cfg)) > 1:
        return cfg
    path = cache_path(cfg)
    if not file_exists(path / "zarr.json"):
        return cfg
    manifest = read_manifest(path)
    if cfg.distill.k > manifest["k"]:
        raise UserError(f"distill.k = {cfg.distill.k} is larger than the cached k = "
                        f"{manifest['k']} of {path}")
    selection = manifest.get("selection") or {"kind": "topk"}
    recorded = {"cache.k": manifest["k"], "cache.selection": selection["kind"],
                "cache.temperatures": list(manifest["temperatures"])}
    if selection["kind"] == "draws":  # no value code: nothing but ids is stored
        recorded.update({"cache.draws": selection["draws"], "cache.sample_seed": selection["seed"]})
    else:
        recorded["cache.value_code"] = manifest["value_code"]
    if selection["kind"] == "sample":
        recorded.update({"cache.sample_temperature": selection["temperature"],
                         "cache.sample_seed": selection["seed"]})
    return cfg.replace(**recorded)


def student_dir(cfg: Config) -> Path:
    return cfg.run_path / "students" / run_name(cfg)


def train(cfg: Config, *, caches: tuple[LogitCache, ...] = ()) -> Path:
    """Train (or resume, or find finished) the student of `cfg`; returns its directory.

    `caches`: already opened logit caches, one per teacher, to share (the sweep opens them once).
    """
    cfg = as_cached(cfg)
    out = student_dir(cfg)
    if is_finished(out):
        print(f"{out} is already trained (delete it to train again)")
        return out
    train_tokens, val_tokens = open_tokens(cfg)
    vocab_size = train_tokens.vocab_size
    distil = distillation(cfg, train_tokens, vocab_size=vocab_size, caches=caches)
    model = new_model_of(cfg.student, vocab_size=vocab_size,
                         eos_token_id=train_tokens.manifest["tokenizer"].get("eos_id", 0))
    return fit(model, cfg=cfg, hp=cfg.student, out_dir=out, tokens=train_tokens,
               val_tokens=val_tokens, distil=distil, card=card(cfg, train_tokens, distil))


def card(cfg: Config, tokens: TokenStore, distil: Distillation | None) -> dict:
    """How the student is made, for its model card: the teachers and the caches it read (from
    the caches' manifests) with their weights, or the online teachers; alpha and T; the token
    store."""
    d = cfg.distill
    facts = {"kind": "student", "mode": "ce-baseline" if distil is None else d.mode}
    if distil is not None:
        members = teachers_of(cfg)
        sources = ([cache_facts(cache, k=distil.k) for cache in distil.caches] if distil.caches
                   else [{"teacher": online_teacher_name(cfg, member)} for member in members])
        if len(sources) == 1:
            facts.update(sources[0])
        else:
            facts.update({
                "teacher": " + ".join(f"{w:.3g} x {m.label}"
                                      for m, w in zip(members, distil.weights)),
                "ensemble": d.ensemble,
                "teachers": [{"name": m.label, "weight": w, **source} for m, w, source
                             in zip(members, distil.weights, sources)]})
        facts.update({"alpha": d.alpha, "temperature": d.temperature})
    return {**facts, "token_store": tokens.fingerprint[:16], "seq_len": tokens.seq_len}


def cache_facts(cache: LogitCache, *, k: int | None) -> dict:
    """A cache's part of a model card: its teacher (from the manifest) and what it holds."""
    teacher, selection = cache.manifest.get("teacher") or {}, cache.selection
    return {
        "teacher": teacher.get("name") if isinstance(teacher, dict) else str(teacher),
        "teacher_fingerprint": teacher.get("fingerprint") if isinstance(teacher, dict) else None,
        "cache": str(cache.path), "cache_fingerprint": cache.fingerprint,
        "selection": "topk" if selection["kind"] == "topk" else
        f"{'sample' if selection['kind'] == 'sample' else 'counted draws'} ({cache.k} draws at "
        f"T = {cache.sample_temperature:g})",
        "k": k or cache.k, "value_code": cache.value_code}


def online_teacher_name(cfg: Config, member: EnsembleMember) -> str:
    source = resolve_teacher(teacher_config(cfg, member))
    return source.model + (f" + adapter {source.adapter}" if source.adapter else "")


def teacher_config(cfg: Config, member: EnsembleMember) -> Config:
    """The view of `cfg` whose `teacher:` is the member's teacher (where it and its cache live,
    and what online mode loads); a member that is only a cache has none."""
    if member.cache:
        raise UserError(f"distill.teachers entry {member.cache} is a cache: online KD needs the "
                        "teacher itself (name it from `teachers:`)")
    return cfg.for_teacher(member.teacher) if member.teacher else cfg


def distillation(cfg: Config, tokens: TokenStore, *, vocab_size: int,
                 caches: tuple[LogitCache, ...] = ()) -> Distillation | None:
    """The teacher signal of `cfg.distill`: None for the CE baseline (nothing opened)."""
    d = cfg.distill
    if d.alpha == 1:
        return None
    members = teachers_of(cfg)
    weights = weights_of(members)
    if d.mode == "online":
        teachers = tuple(load_online_teacher(teacher_config(cfg, member), vocab_size=vocab_size)
                         for member in members)
        return Distillation(alpha=d.alpha, temperature=d.temperature, teachers=teachers,
                            weights=weights, ensemble=d.ensemble)
    caches = caches_at(caches or open_caches(cfg, tokens, vocab_size=vocab_size), d.temperature)
    if len(caches) > 1 and d.k:
        raise UserError(f"distill.k = {d.k}: an ensemble reads every entry of each cache "
                        "(distill.k=0)")
    k = (d.k or caches[0].k) if len(caches) == 1 else None
    for cache in caches:
        check_cache_use(cache, k=k, temperature=d.temperature)
    skip = bad_shards(caches) if d.skip_bad_shards else ()
    return Distillation(alpha=d.alpha, temperature=d.temperature, caches=tuple(caches),
                        weights=weights, k=k, vocab_size=vocab_size, skip_shards=skip)


def open_caches(cfg: Config, tokens: TokenStore, *, vocab_size: int) -> tuple[LogitCache, ...]:
    """The train cache of each teacher the student distils from, each checked against `tokens`
    (the same token store, tokenizer and vocabulary: row i of every cache is sequence i), and,
    for an ensemble, against each other's shard layout."""
    caches = []
    for member in teachers_of(cfg):
        path = cache_path(cfg, member)
        if not file_exists(path / "zarr.json"):
            make = (f"make teacher-logits TEACHER={member.teacher}" if member.teacher
                    else "make teacher-logits")
            raise UserError(f"no logit cache at {path}: run `{make}` first "
                            "(or distill.alpha=1 for the CE baseline)")
        caches.append(open_cache(path, token_store=tokens, vocab_size=vocab_size))
    layouts = {(cache.chunk_sequences, cache.shard_sequences) for cache in caches}
    if len(layouts) > 1:
        raise UserError("the ensemble's caches were written with different cache.chunk_sequences"
                        " or cache.shard_chunks (" + ", ".join(
                            f"{c.path}: {c.chunk_sequences} x {c.shard_sequences // c.chunk_sequences}"
                            for c in caches) + "): rebuild one with the other's settings")
    return tuple(caches)


def caches_at(caches: tuple[LogitCache, ...], temperature: float) -> tuple[LogitCache, ...]:
    """The caches as a student at `temperature` reads them (counted draws: the draws made at
    it); a cache without draws there is refused with one line."""
    try:
        return tuple(cache.at_temperature(temperature) for cache in caches)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_cache_use(cache: LogitCache, *, k: int | None, temperature: float) -> None:
    """Refuse a k the cache cannot give; say when T is not stored (its tail is approximated)."""
    if k is not None and k > cache.k:
        raise UserError(f"distill.k = {k} is larger than the cached k = {cache.k} of {cache.path}")
    if cache.sample_temperature is not None:
        if k is not None and k != cache.k:  # the first k of draws sorted by logit are not a sample
            raise UserError(f"distill.k = {k}: {cache.path} holds {cache.k} sampled entries per "
                            f"position, which are used together (distill.k=0 or {cache.k})")
    elif not any(same_temperature(t, temperature) for t in cache.temperatures):
        near = min(cache.temperatures, key=lambda t: abs(t - temperature))
        print(f"note: distill.temperature = {temperature:g} is not stored in {cache.path} "
              f"(stored: {', '.join(f'{t:g}' for t in cache.temperatures)}); approximating the "
              f"teacher's tail from T = {near:g} (see training/losses.py: teacher_buckets)")


def bad_shards(caches: tuple[LogitCache, ...]) -> tuple[int, ...]:
    """Verify every shard of every cache; return the bad ones (any cache's: they share one
    layout) and say how many tokens skipping them costs."""
    shards = set()
    for cache in caches:
        problems = cache.verify(progress=True)
        if whole := [problem for problem in problems if problem.shard is None]:
            raise UserError(f"logit cache {cache.path} cannot be used: {whole[0]}")
        shards |= {problem.shard for problem in problems}
    if shards:
        cache = caches[0]
        rows = sum(min(cache.shard_rows(s)[1], cache.n_sequences) - cache.shard_rows(s)[0]
                   for s in shards)
        print(f"skipping {len(shards)} bad cache shard(s) {sorted(shards)[:10]}: {rows} sequences, "
              f"{rows * cache.seq_len:,} tokens left out of training")
    return tuple(sorted(shards))


def load_online_teacher(cfg: Config, *, vocab_size: int) -> torch.nn.Module:
    """The teacher of `cfg`, resident for online KD (as the logits job loads it)."""
    device = resolve_device(cfg.student.device, "student.device")
    source = resolve_teacher(cfg)
    teacher = load_teacher(source.model, adapter=source.adapter, device=device,
                           dtype=cfg.teacher.dtype if device.type == "cuda" else "fp32",
                           quantization=cfg.teacher.quantization)
    if teacher.config.vocab_size != vocab_size:
        raise UserError(f"teacher {source.model} has vocabulary {teacher.config.vocab_size}, the "
                        f"student {vocab_size}: they must share the tokenizer")
    teacher.requires_grad_(False)
    return teacher


def main(cfg: Config) -> None:
    train(cfg)


if __name__ == "__main__":
    run(main, "Train a student: CE baseline (distill.alpha=1), cached KD, or online KD.")
