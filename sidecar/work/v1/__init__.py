"""Generated from proto/sidecar/work: do not edit, run `make proto`."""
