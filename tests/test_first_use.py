"""A new user's first run: files written with the umask's mode, packaging metadata without setuptools'
deprecation warning."""
from __future__ import annotations

import os
import stat

import pytest
import tomllib
from helpers import ROOT

import snnet


def test_export_files_get_the_umasks_mode(tiny, tmp_path):
    """model.safetensors was written 0600 (safetensors' temporary file) beside 0644 files: every file of an export
    gets the mode open() gives under the umask."""
    old = os.umask(0o022)
    try:
        snnet.export(tiny.ckpt, 1, tmp_path / "cfg1", tiny.config, formats=["torchscript"])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "cfg1").iterdir()}
    assert set(modes) == {"model.safetensors", "model.json", "model.torchscript.pt"}
    assert set(modes.values()) == {0o644}, modes


def test_project_license_is_an_spdx_string():
    """setuptools >= 77 warns (twice per install) that a project.license table is deprecated: an SPDX string."""
    meta = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())
    assert meta["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])


@pytest.mark.slow
def test_pricing_a_network_prints_no_deprecation_warning():
    """fvcore's import scripts a function with torch.jit.script, which torch 2.14 deprecates: every evaluation and
    export printed a FutureWarning. The one warning is silenced around that import (stitching/cost.py), so a fresh
    process that turns warnings into errors prices a network."""
    import subprocess
    import sys
    code = ("import torch\nfrom snnet.stitching.cost import count_flops\n"
            "m = torch.nn.Linear(4, 3)\nprint(count_flops(m, m, torch.zeros(1, 4)))\n")
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "12", out.stderr[-2000:]
