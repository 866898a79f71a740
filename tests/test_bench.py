"""gpu_speed/bench.py runs (a CPU smoke run with tiny models) and counts work as the paper does. Timings are
never asserted: they depend on the machine."""

import json

import pytest

from gpu_speed import bench
from panda import PandaConfig


def test_mac_count_is_the_papers_105_gmac_per_video():
    cfg = PandaConfig.preset("paper")
    assert bench.stab_macs(cfg) / 1e9 == pytest.approx(105.4, abs=0.1)  # the paper's Table 3: 105.5
    # The pooled-attention rewrite skips GSTRA's (17.2 G) and FSRA's (4.3 G) key/value projections.
    assert bench.stab_macs(cfg, pooled=True) / 1e9 == pytest.approx(105.4 - 17.2 - 4.3, abs=0.3)


def test_vit_l14_mac_count():
    # ViT-L/14 at 224 px: ~81 GMAC per image (fvcore's "81 GFLOPs")
    assert bench.vit_macs(1024, 24, 4096, 14, 224) / 1e9 == pytest.approx(81, abs=1)


def test_tflops_count_two_operations_per_multiply_add():
    # 16 videos of 105.4 GMAC in 12.11 ms: 278.5 TFLOP/s, the unit of the matmul peak (2 n^3 / time)
    assert bench.tflops(16 * 105.4e9, 12.11) == pytest.approx(278.5, abs=0.1)


def test_cpu_smoke_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device=cpu", "--quick=true", f"--json={out}"])
    results = json.loads(out.read_text())["results"]
    sections = {r["section"] for r in results}
    assert {"peak", "stab", "vit", "decode", "train"} <= sections
    assert {r["channels"] for r in results if r["section"] == "stab"} == {3, 4}
    assert {r["name"] for r in results if r["section"] == "decode"} >= {"eager"}
    assert {r["name"] for r in results if r["section"] == "stab"} >= {"eager", "eager, plain forms"}
    printed = capsys.readouterr().out
    for title in ("== panda bench on CPU", "[1] STAB + projector", "[2] ViT-L/14", "[3] whole model", "[4] training"):
        assert title in printed


def test_only_runs_the_named_sections(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device=cpu", "--quick=true", "--only=decode", f"--json={out}"])
    assert {r["section"] for r in json.loads(out.read_text())["results"]} == {"peak", "decode"}


def test_unknown_section_is_an_error():
    with pytest.raises(ValueError, match="unknown sections"):
        bench.main(["--device=cpu", "--only=stab,nonsense"])
