"""Packed rows contain <|endoftext|>, which is also the pad id: every forward on them must pass
an explicit attention mask, or transformers warns "We strongly recommend passing in an
`attention_mask`" on stderr in every logits, training and evaluation run."""

import logging

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

from precompute.logits import teacher_topk
from storage.reader import Batch
from storage.tokens import write_token_store
from training.scoring import lm_metrics
from training.models import new_model
from training.loop import Distillation, batch_losses

WARNING = "recommend passing in an `attention_mask`"


@pytest.fixture
def model():
    return new_model(vocab_size=300, n_positions=32, n_layer=2, n_embd=32, n_head=2, eos_token_id=0)


@pytest.fixture
def rows():
    tokens = torch.randint(1, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0  # a document boundary at the start of a packed row: the pad id
    return tokens


def padding_warnings(call) -> list[str]:
    """transformers' warnings about padding without a mask while `call()` runs."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # it warns once per process: forget earlier ones
    hf_logging.set_verbosity_warning()
    library.addHandler(handler)
    try:
        call()
    finally:
        library.removeHandler(handler)
    return [m for m in messages if WARNING in m]


def test_the_warning_fires_without_a_mask(model, rows):
    assert padding_warnings(lambda: model(input_ids=rows))  # else the tests below prove nothing


def test_teacher_logits_pass_a_mask(model, rows):
    assert padding_warnings(lambda: teacher_topk(model, rows, k=4, temperatures=(1.0,))) == []


def test_training_forwards_pass_a_mask(model, rows):
    batch = Batch(indices=np.arange(2), tokens=rows.numpy())
    teacher = new_model(vocab_size=300, n_positions=32, n_layer=2, n_embd=32, n_head=2, seed=1)
    online = Distillation(alpha=0.5, temperature=2.0, teachers=(teacher,))
    for distil in (None, online):
        assert padding_warnings(lambda: batch_losses(
            model, batch, distil, device=torch.device("cpu"), amp_dtype=None)) == []


def test_evaluation_passes_a_mask(model, rows, tmp_path):
    store = write_token_store(tmp_path / "val.zarr", sequences=rows.numpy(),
                              manifest={"tokenizer": {"fingerprint": "t", "vocab_size": 300}})
    assert padding_warnings(lambda: lm_metrics(model, store, batch_size=4)) == []
