"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)  # the example relies on auto
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    y, dx = namespace["y"], namespace["dx"]
    assert y.shape == dx.shape == (32, 64, 28, 28)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
