"""merit-lab benchmarks: `make bench` (python -m benchmarks.run_all). Not part of the wheel."""
