"""Model builders: tiny random-weight SD1/SD2/SDXL models for tests, and the real architectures
with random weights for benchmarks. Nothing here downloads weights."""
