"""Generated from proto/sidecar/keda: do not edit, run `make proto`."""
