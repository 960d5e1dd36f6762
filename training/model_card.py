"""The model card (README.md) of every model folder: Hugging Face front matter plus how the model
was made.

The facts travel in the front matter under `babylm_kd` (machine-readable, so `make eval` can add
the scores it measures and render the card again); the body is written from them. A student's
facts come from what it actually read (the cache's manifest), never from the config alone.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CARD = "README.md"
FRONT_MATTER = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "language": ["en"], "tags": ["babylm", "knowledge-distillation", "babylm-kd"]}

LABELS = {
    "kind": "kind", "architecture": "architecture", "parameters": "parameters",
    "method": "training", "base": "base model", "teacher": "teacher",
    "teacher_fingerprint": "teacher weights (sha256)", "cache": "logit cache",
    "cache_fingerprint": "cache manifest (sha256)", "selection": "selection", "k": "k",
    "value_code": "value code", "alpha": "alpha (CE weight)", "temperature": "temperature T",
    "mode": "distillation mode", "n_positions": "context (positions)", "seq_len":
    "training sequence length", "tokens_seen": "tokens seen", "words_seen": "words seen",
    "steps": "optimizer steps", "val_perplexity": "validation perplexity",
    "token_store": "token store (fingerprint)",
}


def render_card(name: str, facts: dict) -> str:
    """The card of model `name`: front matter (with `facts` under `babylm_kd`) and a body that
    lists the facts and, when `facts["minimal_pairs"]` holds them, the minimal-pair scores."""
    front = yaml.safe_dump({**FRONT_MATTER, "babylm_kd": facts}, sort_keys=False)
    lines = [f"---\n{front}---", "", f"# {name}", "",
             "Made with babylm-kd (knowledge distillation from an offline teacher-logit cache).",
             "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`;",
             "the tokenizer prepends `<|endoftext|>` as BOS, so every word of a text is scored.",
             "", "| | |", "|---|---|"]
    for key, value in facts.items():
        if key != "minimal_pairs" and value not in (None, ""):
            lines.append(f"| {LABELS.get(key, key)} | {_cell(key, value)} |")
    scores = facts.get("minimal_pairs") or {}
    if scores:
        conventions = sorted({c for suite in scores.values() for c in suite})
        lines += ["", "## Minimal pairs (macro accuracy over phenomena)", "",
                  "| suite | " + " | ".join(conventions) + " |",
                  "|---|" + "---|" * len(conventions)]
        for suite, by_convention in scores.items():
            lines.append(f"| {suite} | " + " | ".join(
                "-" if by_convention.get(c) is None else f"{100 * by_convention[c]:.1f}%"
                for c in conventions) + " |")
        lines += ["", "Conventions: `ours` (BOS, no leading space, ties wrong), `lm_eval` "
                  "(lm-evaluation-harness: a leading space, ties right), `babylm2025` (the BabyLM "
                  "2025 pipeline: the tokenizer's own encoding, ties right)."]
    return "\n".join(lines) + "\n"


def _cell(key: str, value) -> str:
    if key in ("tokens_seen", "words_seen", "parameters", "steps") and isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_card_facts(folder: Path) -> dict:
    """The `babylm_kd` facts of the card in `folder` (empty when it has none or is unreadable)."""
    path = Path(folder) / CARD
    try:
        text = path.read_text()
        _, front, _ = text.split("---\n", 2)
        facts = (yaml.safe_load(front) or {}).get("babylm_kd")
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return {}
    return facts if isinstance(facts, dict) else {}
