"""Benchmarks of work-sidecar side by side with the official SDK worker (`python -m bench`, `make bench`).

Everything runs on loopback against the Work API emulator in its own process: the sidecar in its own process
(`work-sidecar serve`), sandboxes as Python gRPC clients built only from the generated stubs, and the baseline as
the official `anthropic` SDK's `EnvironmentWorker` (one worker per sandbox, as users run them). Every figure is
measured; results go to `bench/results/` (JSON, Markdown table, PNG plots).
"""
