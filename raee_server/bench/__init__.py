"""Offline tools: benchmarks, vector-store scale, soak and load tests (extra: [bench])."""
