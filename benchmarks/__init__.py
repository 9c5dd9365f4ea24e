"""Benchmarks: our ``chat-server`` against a grpc.aio reference (``python -m benchmarks``)."""
