"""Benchmarks: train-step throughput and MFU against a PyTorch peer, compile counts, sampling."""
