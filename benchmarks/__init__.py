"""`make bench`'s code (see README.md here): a package, run from the repository root as `python -m benchmarks.run`,
so that its modules are `benchmarks.run`, `benchmarks.worker`, ... and none of them shadows an installed package."""
