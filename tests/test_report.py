"""Reports of results records (`overfill/report.py`)."""
import pytest

from overfill.cli import main
from overfill.errors import OverfillError
from overfill.report import load_results


def test_report_rejects_files_of_another_format(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {}}')
    assert main(["eval", "--report", str(bad), "--out", str(tmp_path / "r.md")]) == 2
    assert "not a results file of `overfill eval`" in capsys.readouterr().err
    bad.write_text("not json")
    with pytest.raises(OverfillError, match="not a results file"):
        load_results(bad)
    with pytest.raises(OverfillError, match="not found"):
        load_results(tmp_path / "missing.json")


def record(label: str, acc: float, decoder: str | None) -> dict:
    """A results record as `overfill eval` writes one, cut to what a report reads."""
    return {"format": "overfill-eval/1", "label": label, "mode": "overfill" if decoder else "full", "chat": None,
            "tasks": {"arc_easy": {"acc": acc, "acc_stderr": 0.01, "samples": 10}},
            "models": {"full": "full", "decoder": decoder, "decode_params": 2e6 if decoder else 4e6,
                       "decode_bytes_bf16": 4e6 if decoder else 8e6},
            "timings": {"total_s": 3.0}}


def test_a_report_of_two_records_without_torch(tmp_path):
    import subprocess
    import sys

    from overfill.report import write_report

    out = tmp_path / "r" / "report.md"
    write_report([record("full", 0.5, None), record("OverFill", 0.45, "dec")], out)
    text = out.read_text()
    assert "| arc_easy | acc | 0.5000 ± 0.0100 | 0.4500 ± 0.0100 |" in text
    assert "**average** (1 tasks)" in text and out.with_suffix(".png").stat().st_size > 1000
    code = "import sys, overfill.report; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_bench_markdown_has_a_table_per_configuration():
    from overfill.report import bench_markdown

    run = {"ttft_s": 0.01, "tpot_s": 0.002, "tpot_p90_s": 0.003, "e2e_s": 0.2, "tokens_per_s": 320.0,
           "floor_s": 0.001, "floor_fraction": 0.5, "kv_bytes_per_token": 2048}
    result = {"configs": [{"prompt_len": 8, "output_len": 4, "batch_size": 1, "runs": {"overfill": run},
                           "ratios": {"full/overfill tpot": {"median": 1.5, "min": 1.4, "max": 1.6}}}]}
    text = bench_markdown(result)
    assert "### prompt 8, output 4, batch 1" in text
    assert "| overfill | 10.0 | 2.00 | 3.00 | 0.200 | 320.0 | 1.00 | 50% | 2.0 |" in text
    assert "| full/overfill tpot | 1.50 | 1.40 | 1.60 |" in text
