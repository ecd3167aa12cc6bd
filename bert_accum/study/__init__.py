"""Study tooling built on the core: grids, the one-step probe, reports, the BatchNorm study, the benchmark,
the demo and the distributed check."""
