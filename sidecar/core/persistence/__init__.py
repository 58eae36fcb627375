"""Persistence for `--state-dir`: the lease journal, lease tokens a successor can verify, adoption at start."""
