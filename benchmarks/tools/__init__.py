"""Diagnostic tools of the benchmarks (compile check, config sweeps, profiles, host overhead, first step,
trainer smoke run, GPU check script), each run as ``python -m benchmarks.tools.<name>``."""
