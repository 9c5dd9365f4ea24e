"""Benchmarks: our ``chat-server`` side by side with a grpc.aio reference (``python -m benchmarks``)."""
