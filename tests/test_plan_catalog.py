"""The hardware catalog: every card the issue asks for, each figure sourced and self-consistent."""

import pytest

from onecard.errors import UsageError
from onecard.plan.catalog import CATALOG, GPUS, find_gpu, with_vram

REQUIRED = ["rtx3060", "rtx3080", "rtx3090", "rtx4060", "rtx4060ti-16gb", "rtx4070", "rtx4070-super",
            "rtx4070ti-super", "rtx4070-laptop", "rtx4080", "rtx4090", "rtx5070", "rtx5080", "rtx5090",
            "a10", "l4", "t4", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200"]


def test_every_required_card_is_there_with_a_source():
    assert set(REQUIRED) <= set(CATALOG)
    for gpu in GPUS:
        assert gpu.source and gpu.vram_gib > 0 and gpu.peak_bf16 > 0 and gpu.power_watts > 0
        assert gpu.memory_bandwidth > 0 and gpu.pcie[0] in (3, 4, 5)


def test_fp8_only_where_the_tensor_cores_have_it():
    for gpu in GPUS:
        has_fp8 = gpu.compute_capability >= (8, 9)
        assert (gpu.peak_fp8 is not None) == has_fp8, gpu.key


@pytest.mark.parametrize("key,sms,ghz", [("rtx4070", 46, 2.475), ("rtx4090", 128, 2.52), ("rtx3090", 82, 1.695),
                                         ("rtx5090", 170, 2.407), ("rtx4060", 24, 2.46), ("rtx4080", 76, 2.505)])
def test_geforce_peaks_are_512_flop_per_clock_per_sm(key, sms, ghz):
    """Dense bf16 with fp32 accumulate on GeForce: SMs x boost clock x 512 (whitepaper figures)."""
    assert CATALOG[key].peak_bf16 == pytest.approx(sms * ghz * 1e9 * 512, rel=5e-3)


def test_reference_figures():
    """Figures of docs/hardware.md (the RTX 4070 derived, the others from vendor documents)."""
    assert CATALOG["rtx4070"].peak_bf16 == 58.3e12 and CATALOG["rtx4070"].peak_fp8 == 116.6e12
    assert CATALOG["rtx4090"].peak_fp8 == 330.3e12 and CATALOG["h100-sxm"].peak_bf16 == 989.4e12
    assert CATALOG["a100-80gb"].peak_bf16 == 312e12 and CATALOG["rtx3090"].memory_bandwidth == 936e9


@pytest.mark.parametrize("name,key", [("rtx4070", "rtx4070"), ("RTX 4070", "rtx4070"),
                                      ("NVIDIA GeForce RTX 4070", "rtx4070"), ("4070 super", "rtx4070-super"),
                                      ("RTX-4070-Ti-SUPER", "rtx4070ti-super"), ("4070 laptop", "rtx4070-laptop"),
                                      ("NVIDIA GeForce RTX 4070 Laptop GPU", "rtx4070-laptop"), ("Tesla T4", "t4"),
                                      ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("h100 pcie", "h100-pcie"),
                                      ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("h200", "h200"),
                                      ("NVIDIA GeForce RTX 3070", "rtx3070"), ("RTX 3060 Ti", "rtx3060ti"),
                                      ("NVIDIA GeForce RTX 4070 Ti", "rtx4070ti"), ("4060 ti 8gb", "rtx4060ti-8gb"),
                                      ("NVIDIA GeForce RTX 4060 Laptop GPU", "rtx4060-laptop"),
                                      ("NVIDIA GeForce RTX 4080 SUPER", "rtx4080-super"), ("3080 ti", "rtx3080ti")])
def test_names_are_forgiving(name, key):
    assert find_gpu(name)[0].key == key


def test_a_short_name_picks_the_common_part_and_says_so():
    gpu, note = find_gpu("h100")
    assert gpu.key == "h100-sxm" and "SXM" in note
    gpu, note = find_gpu("A100")
    assert gpu.key == "a100-80gb" and "80 GB" in note
    assert find_gpu("rtx4090")[1] is None


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UsageError, match="rtx4070.*h100-sxm"):
        find_gpu("rtx 9090")


def test_vram_override():
    gpu = with_vram(CATALOG["rtx4060ti-16gb"], 8)
    assert gpu.vram_bytes == 8 * 2**30 and "--vram" in gpu.note
    with pytest.raises(UsageError):
        with_vram(gpu, 0)


def test_pcie_rates():
    assert CATALOG["rtx4070"].pcie_bytes_per_s == pytest.approx(31.5e9, rel=1e-3)  # gen 4 x16
    assert CATALOG["rtx4060"].pcie_bytes_per_s == pytest.approx(15.75e9, rel=1e-3)  # gen 4 x8
    assert CATALOG["h100-sxm"].pcie_bytes_per_s == pytest.approx(63e9, rel=1e-3)  # gen 5 x16


def test_every_derived_peak_is_its_sources_sms_times_clock_times_512():
    """Entries computed from a product page: the SMs and boost clock their source names give the
    peak (fp8 twice it on Ada and Blackwell)."""
    import re

    derived = [g for g in GPUS if "FLOP/clk/SM" in g.source]
    assert len(derived) >= 15
    for gpu in derived:
        sms, ghz = re.search(r"(\d+) SMs, (?:[\d.]+-)?([\d.]+) GHz boost", gpu.source).groups()
        assert gpu.peak_bf16 == pytest.approx(int(sms) * float(ghz) * 1e9 * 512, rel=2e-3), gpu.key
        if gpu.peak_fp8:
            assert gpu.peak_fp8 == pytest.approx(2 * gpu.peak_bf16, rel=2e-3), gpu.key
