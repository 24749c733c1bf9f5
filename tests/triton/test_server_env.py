"""Which environment LocalTritonServer runs the server from, without starting one: the server
needs numpy<2 (nvidia-pytriton), the tests and clients run on numpy 2, so the two are apart."""
import sys
from pathlib import Path

import numpy as np
import pytest

from rmt_export import triton_server
from rmt_export.triton_server import VENV_VARIABLE, LocalTritonServer, TritonInstall, TritonUnavailable, server_venv


def test_the_server_environment_is_the_argument_then_the_variable_then_the_checkouts(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_server, "SOURCE_ROOT", tmp_path)
    monkeypatch.delenv(VENV_VARIABLE, raising=False)
    assert server_venv() is None                                # none: this interpreter's environment
    (tmp_path / ".venv-triton").mkdir()
    assert server_venv() == tmp_path / ".venv-triton"
    monkeypatch.setenv(VENV_VARIABLE, str(tmp_path / "from-variable"))
    assert server_venv() == tmp_path / "from-variable"
    monkeypatch.chdir(tmp_path)
    assert server_venv("given") == tmp_path / "given"           # relative to the working directory
    assert LocalTritonServer(tmp_path, venv="given").venv == tmp_path / "given"


def test_a_missing_server_environment_says_how_to_make_it(tmp_path):
    with pytest.raises(TritonUnavailable, match=r"no Triton server environment at .*missing-venv.*"
                                                r"make \.venv-triton/\.installed"):
        TritonInstall.find(tmp_path / "missing-venv")


def test_the_test_environment_cannot_be_the_server(monkeypatch):
    """This environment runs numpy 2 (requirements-dev.txt): with or without nvidia-pytriton
    it is refused as the server's."""
    assert int(np.__version__.split(".")[0]) >= 2, "the suite is meant to run on numpy 2"
    monkeypatch.delenv(VENV_VARIABLE, raising=False)
    with pytest.raises(TritonUnavailable, match=r"no Triton server|needs numpy<2"):
        TritonInstall.find(Path(sys.prefix))
