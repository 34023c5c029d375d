"""The block-mask set-up suite stays runnable (tiny sizes; timings are not checked)."""

from benchmarks import block_mask_setup


def test_block_mask_setup_runs_and_checks_equality(tmp_path):
    out = tmp_path / "table.md"
    assert block_mask_setup.main(["--lengths", "256", "512", "--torch-max", "256", "--repeat",
                                  "1", "--block", "64", "--device", "cpu",
                                  "--out", str(out)]) == 0
    text = out.read_text()
    assert "## block mask" in text and "- command: `python -m benchmarks.block_mask_setup" in text
    assert "| 256 | causal |" in text and "| yes |" in text and "not run" in text
