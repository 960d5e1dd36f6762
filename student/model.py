"""GPT-2 models of a configured shape, randomly initialised from a seed (students, and teachers
trained from scratch), and the device they run on."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def new_gpt2(*, vocab_size: int, seq_len: int, n_layer: int, n_embd: int, n_head: int,
             dropout: float = 0.0, seed: int = 0, eos_token_id: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (tied input/output embeddings, GPT-2's init) from `seed`.

    `eos_token_id` doubles as BOS: the token store joins documents with it.
    """
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
