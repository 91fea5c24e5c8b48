"""Tests of the container, Kubernetes, the runtime-only install and the benchmarks."""
