"""What both stages share: the training loop, checkpoints and the metrics log, device and
distributed setup, the models and tokenizers every stage builds or loads, the losses (with
their CPU kernel, rows.c) and language-model scoring. See docs/architecture.md."""
