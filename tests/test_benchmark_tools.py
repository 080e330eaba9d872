"""The CPU-testable pieces of benchmarks/: the attention ratio table read from pytest-benchmark JSON."""
import json

from benchmarks import attention_table


def _bench(shape, provider, ms, tflops, config=None, **speedups):
    info = dict(ms_per_call=ms, tflops=tflops, **{f"speedup_vs_{k}": v for k, v in speedups.items()})
    if config is not None:
        info["config"] = config
    return {"params": {"shape_name": shape, "provider": provider}, "extra_info": info}


def test_attention_table_rows_and_ratios(tmp_path, capsys):
    report = {"datetime": "2026-11-26T10:00:00", "benchmarks": [
        _bench("B2-b128", "torch_jvp_math", 6.0, 20.0),
        _bench("B2-b128", "jvp_flash_attention", 2.0, 60.0, torch_jvp_math=3.0),
        _bench("B2-b128", "triton_fwd+tangent", 0.8, 150.0, "BM64 BN32 w4 s3", torch_jvp_math=7.5,
               jvp_flash_attention=2.5),
        {"params": {"shape_name": "B2-b128", "provider": "flash_fwd"}, "extra_info": {}},  # a skipped case
    ]}
    path = tmp_path / "attention.json"
    path.write_text(json.dumps(report))
    assert attention_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith("B2-b128")]
    assert [r[1] for r in rows] == ["torch_jvp_math", "jvp_flash_attention", "triton_fwd+tangent"]
    assert rows[2][2:] == ["0.800", "150.0", "7.50×", "2.50×", "BM64", "BN32", "w4", "s3"]
    assert rows[0][4:] == ["—", "—"]


def test_attention_table_usage(capsys):
    assert attention_table.main([]) == 2
