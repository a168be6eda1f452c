"""Benchmarks of outrunner: ``bench.e2e`` (the whole path, see docs/performance.md) and
``bench/docker_start.py`` (the Docker provisioner alone)."""
