"""Every stage end to end: `python -m pipeline` (`make demo`)."""
