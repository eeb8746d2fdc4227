import pytest
import torch

from overfill import device as device_mod
from overfill.device import CPU_BF16_MIN_SPEEDUP, resolve_precision
from overfill.errors import OverfillError

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with(monkeypatch):
    """A CPU with these flags whose bf16 product runs `speedup` x fp32."""
    def make(flags, speedup):
        monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(device_mod, "cpu_bf16_speedup", lambda threads: speedup)
    return make


def test_auto_takes_bf16_where_the_timed_product_is_faster(cpu_with):
    cpu_with({"avx512f", "amx_bf16", "avx512_bf16"}, 7.0)
    choice = resolve_precision("auto", CPU)
    assert choice.name == "bf16" and choice.dtype == torch.bfloat16
    assert "amx_bf16" in choice.reason and "7.00x" in choice.reason


def test_auto_keeps_fp32_where_bf16_flags_exist_but_bf16_is_slower(cpu_with):
    # The Xeon with AVX512-BF16 and no AMX: bf16 products at 0.56-0.78x fp32.
    cpu_with({"avx512f", "avx512_bf16"}, 0.6)
    choice = resolve_precision("auto", CPU)
    assert choice.name == "fp32" and "not faster" in choice.reason


def test_auto_needs_a_clear_win_not_noise(cpu_with):
    cpu_with({"avx512_bf16"}, CPU_BF16_MIN_SPEEDUP - 0.05)
    assert resolve_precision("auto", CPU).name == "fp32"
    cpu_with({"avx512_bf16"}, CPU_BF16_MIN_SPEEDUP)
    assert resolve_precision("auto", CPU).name == "bf16"


def test_without_bf16_flags_nothing_is_timed(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(device_mod, "cpu_bf16_speedup", lambda threads: pytest.fail("timed a product"))
    choice = resolve_precision("auto", CPU)
    assert choice.name == "fp32" and "neither" in choice.reason


def test_asked_for_precisions_are_kept_and_slow_bf16_is_said(cpu_with):
    cpu_with({"avx512_bf16"}, 0.6)
    assert resolve_precision("fp32", CPU).name == "fp32"
    bf16 = resolve_precision("bf16", CPU)
    assert bf16.name == "bf16" and "slower than fp32" in bf16.reason
    assert bf16.as_dict() == {"precision": "bf16", "precision_reason": bf16.reason}


def test_unknown_precision_is_refused():
    with pytest.raises(OverfillError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


def test_the_speed_probe_measures_a_positive_ratio():
    device_mod.cpu_bf16_speedup.cache_clear()
    ratio = device_mod.cpu_bf16_speedup(torch.get_num_threads(), rounds=1)
    assert 0.01 < ratio < 100


def test_cpu_caches_reads_sysfs_sizes(tmp_path):
    from overfill.device import cpu_caches

    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "491520K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert cpu_caches(str(tmp_path)) == {"L1": 48 << 10, "L2": 2 << 20, "L3": 480 << 20}
    assert cpu_caches(str(tmp_path / "absent")) == {}
