"""Comparisons of augsvc with its peers and the scripts behind the README's benchmark tables, run
from the repository root as `python -m benchmarks.<name>` (engine, service, e2e, transport,
scaling, scaleout; `bash benchmarks/bench_all.sh` runs them all). They measure ratios side by
side in one run, never timed tests, and are not part of the installed product."""
