"""The benches: end-to-end latency and fan-out against a naive baseline, publish, and faults."""
