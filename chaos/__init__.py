"""The standing chaos and fuzz suite (issue #11): a fault proxy, hostile scenarios, invariants, gRPC fuzzing."""
