"""``python -m batchnorm bench``: the table, the skipped subjects, the plot."""

from __future__ import annotations

import pytest

from batchnorm.__main__ import main


def _run(argv, capsys):
    status = main(["bench", *argv])
    return status, capsys.readouterr().out


def test_bench_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    argv = [
        "--shape",
        "tiny",
        "--shape",
        "16x8",
        "--operation",
        "forward-train",
        "--backend",
        "numpy",
        "--rounds",
        "1",
        "--no-progress",
        "--plot",
        str(png),
    ]
    status, out = _run(argv, capsys)
    assert status == 0
    header = out.splitlines()[0].split()
    assert header[:4] == ["operation", "shape", "dtype", "subject"]
    rows = [line.split() for line in out.splitlines()[2:] if line.startswith("forward-train")]
    assert {(r[1], r[3]) for r in rows} >= {
        ("4x8x4x4", "numpy"),
        ("16x8", "numpy"),
        ("16x8", "copy-numpy"),
    }
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_backend_it_cannot_time(capsys):
    status, out = _run(["--backend", "no-such-backend", "--no-progress"], capsys)
    assert status == 2
    assert "no-such-backend" in out
