"""The gRPC edge: the WorkService handlers, errors as gRPC status, request limits, auth, health, proto conversion."""
