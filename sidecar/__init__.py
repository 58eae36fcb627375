"""work-sidecar: a local gRPC service that owns the self-hosted Work API loop for sandboxes in any language."""

__version__ = "0.1.0"
