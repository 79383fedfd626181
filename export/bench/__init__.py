"""mirasol.export.bench: `mirasol-bench`, how fast the runtime is against PyTorch on this machine.

Kept free of imports: the runtime's measuring child (`python -m mirasol.export.bench.child_runtime`) imports
this package and must never load torch. The run is `run.run_benchmark`, the CLI `cli.main`; what each
section measures and how to read it: docs/benchmark.md.
"""
