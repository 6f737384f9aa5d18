"""`tests/margins.py`: the margins log is read per check, and the scan finds the modules that compare floats."""

from __future__ import annotations

from pathlib import Path

import margins
import reference


def test_worst_ratio_per_check_over_parameters_and_numbered_names(tmp_path: Path) -> None:
    log = tmp_path / "margins.tsv"
    log.write_text(
        "tests/t.py::test_a[fwd-dense]\tgrad 3\t0.2\n"
        "tests/t.py::test_a[rkl-bucket]\tgrad 7\t0.6\n"
        "tests/t.py::test_a[fwd-dense]\tloss\t0.1\n"
        "tests/t.py::test_a[fwd-dense]\tbf16 top1_agreement\t0.3\n"
        "tests/t.py::test_b\tloss\t0.05\n"
    )
    assert margins.worst_ratios(log) == {
        ("tests/t.py::test_a", "grad #"): 0.6,
        ("tests/t.py::test_a", "loss"): 0.1,
        ("tests/t.py::test_a", "bf16 top1_agreement"): 0.3,
        ("tests/t.py::test_b", "loss"): 0.05,
    }


def test_assert_close_records_its_margin_only_when_asked(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import torch

    log = tmp_path / "margins.tsv"
    reference.assert_close(torch.tensor([1.0]), torch.tensor([1.0 + 1e-6]), 1e-5, "value")
    assert not log.exists()
    monkeypatch.setenv("DISTILL_TEST_MARGINS", str(log))
    reference.assert_close(torch.tensor([2.0]), torch.tensor([2.0 + 1e-5]), 1e-4, "value")
    test, what, ratio = log.read_text().strip().split("\t")
    assert "test_assert_close_records_its_margin_only_when_asked" in test and what == "value"
    assert abs(float(ratio) - 0.05) < 1e-3  # 5e-6 relative error against 1e-4


def test_the_scan_covers_the_float_test_modules() -> None:
    files = margins.float_test_files()
    assert "tests/test_losses_reference.py" in files and "tests/test_cross_tokenizer_losses.py" in files
    assert "tests/test_cli.py" not in files
