"""Benchmarks of the soup package, each run from the repository root as
`python -m benchmarks.NAME` (see docs/benchmarks.md); shared helpers in benchmarks.common."""
