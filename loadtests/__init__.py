"""Benchmarks run by `stepserve bench NAME` (each module also has a `main(argv)`)."""
