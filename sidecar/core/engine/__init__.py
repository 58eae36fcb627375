"""The lease engine: polling, hand-over, the lease state machine, renewal, stops, liveness, their policies."""
