"""The commands layer (`overfill/commands/`): what each command prints of the library's results."""
from overfill.commands.bench import bench_command
from overfill.commands.info import InfoArgs, info_command
from overfill.commands.train import summary_line
from conftest import tiny_hf_model


def test_info_reports_sizes_and_compatibility(tmp_path, capsys):
    tiny_hf_model("llama").save_pretrained(tmp_path / "a")
    tiny_hf_model("llama", num_key_value_heads=4).save_pretrained(tmp_path / "b")
    info_command(InfoArgs([str(tmp_path / "a"), str(tmp_path / "b")]))
    out = capsys.readouterr().out
    assert "parameters" in out and "NOT compatible" in out and "num_key_value_heads" in out


def test_bench_command_prints_the_table_and_the_files(tmp_path, capsys, monkeypatch):
    from overfill.bench import BenchConfig
    from overfill.commands import bench as command

    written = [tmp_path / "b.json", tmp_path / "b.md"]
    written[1].write_text("| system | TTFT ms |")
    monkeypatch.setattr(command, "bench", lambda cfg: written)
    bench_command(BenchConfig(out=str(written[0])))
    out = capsys.readouterr().out
    assert out.startswith("| system | TTFT ms |") and f"wrote {written[0]}, {written[1]}" in out


def test_train_summary_line_reads_old_summaries_too():
    summary = {"mode": "overfill", "steps": 3, "tokens": 1200, "tokens_per_s": 50.0, "final_loss": 2.5,
               "final_val_loss": None, "wall_seconds": 9.0}
    assert summary_line("run", summary) == ("trained overfill decoder -> run: 3 steps, 1,200 tokens, 50 tokens/s "
                                            "(fp32), final loss 2.5, val loss None, 9 s")
    assert "(bf16, padding 25.0%)" in summary_line("run", {**summary, "precision": "bf16", "padding": 0.25})
