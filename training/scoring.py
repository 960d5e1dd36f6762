"""Language-model metrics of a model on a token store, as every stage reports them.

`lm_metrics` on a validation token store:
  * each row is scored on its own: position t is predicted from tokens 0..t-1 of the same row, so
    the first token of every row has no context and is not scored (L - 1 scored tokens per row);
  * loss = mean negative log-likelihood per scored token (nats), perplexity = exp(loss);
  * bits per byte = total nats / ln 2 / bytes, where the UTF-8 bytes behind the scored tokens are
    approximated as scored tokens x text_bytes / n_tokens from the store's manifest (the average
    bytes per token of the whole store; exact per token would need an offset map, and the store's
    average is what differs between tokenizers).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from configs import UserError
from storage.tokens import TokenStore


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1 of each row.

    input_ids: (B, T) int64; attention_mask: (B, T) 1 for real tokens, 0 for right padding.
    Returns (B, T - 1) float32; padded positions hold 0.
    """
    # Unpadded rows still get a mask: they hold <|endoftext|>, the pad id, and transformers
    # warns about padding on every run without one.
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # log_softmax(z)[y] = z[y] - logsumexp(z), without materialising a second (B, T, V) tensor.
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    if attention_mask is not None:
        logprobs = logprobs * attention_mask[:, 1:].to(logprobs.dtype)
    return logprobs


def lm_metrics(model, store: TokenStore, *, batch_size: int = 64, device: str | torch.device = "cpu",
               max_sequences: int = 0, desc: str = "val") -> dict:
    """Mean token loss, perplexity and bits per byte of `model` on a token store (see module doc).

    Returns {"loss", "perplexity", "bits_per_byte" (None without `text_bytes` in the manifest),
    "tokens" (scored), "bytes" (estimated), "sequences"}.
    """
    n_rows = min(store.n_sequences, max_sequences) if max_sequences else store.n_sequences
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None)
    if context is not None and store.seq_len > context:
        raise UserError(f"{store.path}: rows of {store.seq_len} tokens are longer than the model's "
                        f"context of {context} positions")
    if model.config.vocab_size < store.vocab_size:
        raise UserError(f"{store.path}: vocabulary of {store.vocab_size} tokens is larger than the "
                        f"model's ({model.config.vocab_size}); it was made with another tokenizer")
    device = torch.device(device)
    model.eval()
    total_nats = 0.0
    scored_per_row = store.seq_len - 1
    with torch.inference_mode(), tqdm(total=n_rows * scored_per_row, desc=desc, unit="tok",
                                      unit_scale=True, leave=False) as bar:
        for start in range(0, n_rows, batch_size):
            rows = store.read(start, min(start + batch_size, n_rows))
            ids = torch.from_numpy(rows.astype(np.int64)).to(device)
            total_nats -= token_logprobs(model, ids).double().sum().item()
            bar.update(ids.shape[0] * scored_per_row)
    tokens = n_rows * scored_per_row
    loss = total_nats / tokens
    text_bytes = store.manifest.get("text_bytes")
    n_tokens = store.manifest.get("n_tokens") or store.n_sequences * store.seq_len
    scored_bytes = tokens * text_bytes / n_tokens if text_bytes else None
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / math.log(2) / scored_bytes if scored_bytes else None,
        "tokens": tokens,
        "bytes": scored_bytes,
        "sequences": n_rows,
    }
