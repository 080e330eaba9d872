"""Print the attention benchmark as a ratio table from pytest-benchmark's JSON:

    pytest benchmarks/bench_attention.py --benchmark-only --benchmark-json attention.json
    python -m benchmarks.attention_table attention.json

One row per (shape, provider): ms per call, TFLOP/s, and the speed-up over torch.func.jvp with math
SDPA and over jvp_flash_attention (where each ran in the same run)."""
import json
import sys


def rows(report: dict):
    for b in report["benchmarks"]:
        info = b.get("extra_info", {})
        if "ms_per_call" not in info:
            continue
        yield (b["params"]["shape_name"], b["params"]["provider"], info["ms_per_call"], info["tflops"],
               info.get("speedup_vs_torch_jvp_math"), info.get("speedup_vs_jvp_flash_attention"),
               info.get("config", ""))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:  # no JSON: the benchmark run wrote none (skipped, crashed, timed out)
        print(f"benchmarks/attention_table.py: cannot read the pytest-benchmark JSON {argv[0]!r}: {e}", file=sys.stderr)
        return 2
    print(f"pytest-benchmark run of {report.get('datetime', '?')}")
    print(f"{'shape':<10} {'provider':<22} {'ms':>9} {'TFLOP/s':>8} {'vs jvp math':>12} {'vs jvp_flash':>13}"
          "  autotuned config")
    fmt = lambda x: f"{x:.2f}×" if x is not None else "—"  # noqa: E731
    for shape, provider, ms, tflops, s_math, s_flash, config in rows(report):
        print(f"{shape:<10} {provider:<22} {ms:9.3f} {tflops:8.1f} {fmt(s_math):>12} {fmt(s_flash):>13}  {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
