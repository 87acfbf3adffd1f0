"""``python -m nblstm`` verifies every available backend and says so."""
import subprocess
import sys

import nblstm
from nblstm.cli import main


def test_verify_report_table_and_status(capsys):
    assert main(["verify", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("dW_h", "db", "float32", "float64", "all passed"):
        assert name in out
    for backend, status in nblstm.available_backends().items():
        assert backend in out and isinstance(status, str)


def test_verify_report_fails_on_error():
    report = nblstm.verify(backend="cpu", shapes=[(2, 1, 2, 3)], dtypes=[float], seed=1)
    assert report.ok and "pass" in str(report)
    broken = type(report)(tuple(type(c)(**{**vars(c), "error": float("nan")})
                                for c in report.checks))
    assert not broken.ok and "FAIL" in str(broken)


def test_module_entry_point_exits_zero():
    completed = subprocess.run([sys.executable, "-m", "nblstm", "--help"], capture_output=True,
                               text=True, check=False)
    assert completed.returncode == 0 and "verify" in completed.stdout
