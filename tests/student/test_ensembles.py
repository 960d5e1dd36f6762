"""Several named teachers and ensembles of their caches on a tiny run: `make teacher` and `make
teacher-logits` per name or for all, the cached ensemble against the online one (k = V: the same
objective), refused mismatches, the sweep over weights, evaluation of every teacher."""

from __future__ import annotations

import json

import pytest

from configs import CONFIG_DIR, ConfigError, load_config
from configs.cli import run, teacher_option
from precompute import logits as logits_job
from precompute import teacher as teacher_job
from precompute.logits import write_cache
from storage.tokens import open_token_store
from student import sweep as sweeper
from student import train as trainer
from student.evaluate import evaluate_run
from training import metrics as metrics_log
from training.model_card import read_card_facts
from tests.precompute.tiny_teacher import VOCAB, save_teacher, tiny_overrides, tiny_run
from tests.student.test_train import STUDENT, one_thread  # noqa: F401 (autouse)

CONFIG = CONFIG_DIR / "demo.yaml"
TEACHERS = ["teachers={gpt2: {architecture: gpt2}, llama: {architecture: llama}}",
            "teacher.from_scratch=true", "teacher.n_layer=1", "teacher.n_embd=32",
            "teacher.n_head=2", "teacher.n_positions=64", "teacher.max_steps=40",
            "teacher.batch_size=16", "teacher.grad_accum=1", "teacher.warmup_steps=1",
            "teacher.eval_every=0", "teacher.checkpoint_every=0", "teacher.lr=3e-3",
            f"cache.k={VOCAB}"]
BOTH = "distill.teachers=[gpt2, llama]"


def settings(root, *extra: str) -> list[str]:
    return [*tiny_overrides(root), *STUDENT, *TEACHERS, *extra]


def config(root, *extra: str):
    return load_config(CONFIG, settings(root, *extra))


def cli(main, root, *extra: str, teacher: str = "", extra_args=None) -> None:
    argv = ["--config", str(CONFIG), *settings(root, *extra)]
    run(main, "test", argv=argv + (["--teacher", teacher] if teacher else []), extra=extra_args)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two teachers trained from scratch, a GPT-2 and a LLaMA, each cached whole (k = V)."""
    root = tiny_run(tmp_path_factory.mktemp("ensemble"), n_train=64, n_val=32)
    cli(teacher_job.main, root, teacher="gpt2", extra_args=teacher_job._arguments)
    assert (root / "teachers" / "gpt2" / "teacher.json").is_file()
    assert not (root / "teachers" / "llama").exists()  # --teacher: that one alone
    cli(teacher_job.main, root, extra_args=teacher_job._arguments)  # all: llama (gpt2 is done)
    cli(logits_job.main, root, extra_args=teacher_option)
    return root


def metrics(folder):
    return metrics_log.read_metrics(folder / metrics_log.METRICS_FILE)


def test_each_named_teacher_has_its_folder_model_and_cache(root):
    from transformers import AutoModelForCausalLM

    for name, kind in (("gpt2", "gpt2"), ("llama", "llama")):
        model = AutoModelForCausalLM.from_pretrained(root / "teachers" / name)
        assert model.config.model_type == kind and model.config.vocab_size == VOCAB
        cache = root / "caches" / name / "train.zarr"
        manifest = json.loads((cache / "zarr.json").read_text())["attributes"]["manifest"]
        assert manifest["teacher"]["name"] == str(root / "teachers" / name)
        assert load_config(root / "caches" / name / "config.yaml").teacher.name == name
    assert not (root / "teacher").exists() and not (root / "cache").exists()


def test_cached_ensemble_is_the_online_probability_mixture_at_k_equal_vocabulary(root):
    """Every entry cached: the cached ensemble's first KL is the online mixture's (to the
    float16 rounding of cached logits); the logit average is another target."""
    first = {}
    for mode, extra in (("cached", []), ("online", ["distill.mode=online"]),
                        ("logits", ["distill.mode=online", "distill.ensemble=logits"])):
        out = trainer.train(config(root, BOTH, "student.max_steps=1", f"distill.run={mode}",
                                   *extra))
        first[mode] = metrics(out)[0]
    assert first["cached"]["kl"] == pytest.approx(first["online"]["kl"], rel=5e-3)
    assert first["cached"]["ce"] == pytest.approx(first["online"]["ce"])
    assert abs(first["logits"]["kl"] / first["online"]["kl"] - 1) > 2e-3  # (deterministic)


def test_cached_ensemble_trains_names_itself_and_says_what_it_read(root):
    out = trainer.train(config(root, "distill.teachers=[gpt2, {teacher: llama, weight: 3}]",
                               "student.max_steps=8"))
    assert out.name == "kd-a0.5-T2-mix-gpt2_0.25-llama_0.75"
    rows = metrics(out)
    assert all(r["kl"] > 0 for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    card = read_card_facts(out)
    assert card["teacher"] == "0.25 x gpt2 + 0.75 x llama" and card["ensemble"] == "probability"
    assert [(t["name"], t["weight"], t["k"]) for t in card["teachers"]] == [
        ("gpt2", 0.25, VOCAB), ("llama", 0.75, VOCAB)]
    assert card["teachers"][1]["cache"] == str(root / "caches" / "llama" / "train.zarr")
    single = trainer.train(config(root, "distill.teachers=[llama]", "student.max_steps=2"))
    assert single.name == f"kd-a0.5-T2-k{VOCAB}-llama"
    assert read_card_facts(single)["cache"] == str(root / "caches" / "llama" / "train.zarr")


def test_sweep_over_weights_names_each_point(root):
    cfg = config(root, BOTH, "distill.sweep_alphas=[0.5]", "distill.sweep_temperatures=[2.0]",
                 "distill.sweep_weights=[[1, 1], [3, 1]]")
    names = [trainer.run_name(point) for point in sweeper.grid(cfg)]
    assert names == ["kd-a0.5-T2-mix-gpt2_0.5-llama_0.5", "kd-a0.5-T2-mix-gpt2_0.75-llama_0.25"]


def refused(capsys, root, *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(trainer.main, root, *extra)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_mismatched_member_is_refused_with_one_line(root, tmp_path, capsys):
    # a cache of another token store (another tokenizer)
    other = tiny_run(tmp_path / "other", n_train=64, tokenizer_seed=1)
    teacher = save_teacher(other / "teacher", seed=2)
    from transformers import AutoModelForCausalLM

    def cache_of(run_root, *, chunk_sequences: int):
        path = run_root / f"cache-{chunk_sequences}" / "train.zarr"
        write_cache(AutoModelForCausalLM.from_pretrained(teacher),
                    store=open_token_store(run_root / "tokens" / "train.zarr"), cache_path=path,
                    teacher={"name": "other"}, k=8, temperatures=(1.0, 2.0),
                    chunk_sequences=chunk_sequences, shard_chunks=2, progress=False)
        return path

    foreign = cache_of(other, chunk_sequences=16)
    err = refused(capsys, root, f"distill.teachers=[gpt2, {{cache: {foreign}}}]")
    assert "another tokenizer" in err and str(foreign) in err
    # this run's token store, but another shard layout
    layout = cache_of(root, chunk_sequences=8)
    err = refused(capsys, root, f"distill.teachers=[gpt2, {{cache: {layout}}}]")
    assert "different cache.chunk_sequences" in err
    err = refused(capsys, root, BOTH, "distill.k=8")
    assert "an ensemble reads every entry" in err
    err = refused(capsys, root, "distill.teachers=[gpt2, {cache: " + str(layout) + "}]",
                  "distill.mode=online")
    assert "online KD needs the teacher itself" in err


def test_ensemble_settings_are_checked_when_loaded(root):
    for extra, message in (
            (["distill.teachers=[gpt3]"], "no teacher named 'gpt3' (known: gpt2, llama)"),
            (["distill.teachers=[{teacher: gpt2, weight: 0}]"], "weight = 0.0 must be positive"),
            (["distill.teachers=[gpt2, gpt2]"], "lists a teacher twice"),
            ([BOTH, "distill.ensemble=logits"], "needs every teacher logit"),
            ([BOTH, "distill.sweep_weights=[[1]]"], "must give each of the 2"),
            (["teachers={'a/b': {}}"], "plain folder name"),
            (["teachers.llama.architecture=mamba"], "teachers.llama.architecture = 'mamba'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config(root, *extra)
    with pytest.raises(SystemExit):  # several teachers and none chosen: which?
        cli(trainer.main, root)


def test_evaluation_scores_every_teacher(root):
    trainer.train(config(root, "distill.alpha=1", "student.max_steps=2"))
    results = evaluate_run(config(root, "eval.max_pairs_per_file=2"))
    names = [row["name"] for row in results["models"]]
    assert names[:2] == ["teachers/gpt2", "teachers/llama"] and "students/baseline" in names
    assert all(row["lm"]["perplexity"] > 1 for row in results["models"])
