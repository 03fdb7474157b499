"""parallelkit microbenchmarks: ``python -m benchmarks.bench_<name>``; see README.md."""
