"""Benchmarks behind `augsvc bench ...`: ratios measured side by side in one run, never timed tests."""
