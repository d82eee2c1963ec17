"""notebooks/*.ipynb run top to bottom (nbclient), on CPU, with every server they use on 127.0.0.1.

The kernel is this interpreter: a ``python3`` kernelspec pointing at ``sys.executable`` is written to a
temporary Jupyter data dir placed first on ``JUPYTER_PATH``, so a fresh CI machine needs no
``ipykernel install`` and never picks up another Python.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    return root


def test_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    for topic in ("quickstart", "remote", "encryption", "diffusers", "hub"):
        assert any(topic in n for n in names), f"no notebook about {topic}"
    for path in NOTEBOOKS:  # committed clean: CI produces the outputs
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"
        raw = json.loads(path.read_text(encoding="utf-8"))  # as stored: nbformat.read fills missing ids in
        assert raw["nbformat"] == 4 and raw["nbformat_minor"] >= 5, path.name
        missing = [i for i, c in enumerate(raw["cells"]) if not c.get("id")]
        assert not missing, f"{path.name}: cells {missing} have no id (MissingIDFieldWarning in Jupyter)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, kernel_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_TENSORIZER_CACHE", str(tmp_path / "cache"))
    users_hf_home = tmp_path / "users-hf-home"  # stands for ~/.cache/huggingface: a notebook must not write there
    monkeypatch.setenv("HF_HOME", str(users_hf_home))
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    tmp = tmp_path / "tmp"  # the kernel's (and its children's) temp folder: the notebook must leave it empty
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    left = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own, shared cache
    assert not left, f"left behind in the temp folder: {left}"
    assert not users_hf_home.exists(), f"wrote into the user's HF home: {sorted(users_hf_home.rglob('*'))[:5]}"
    printed = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any("IProgress not found" in t for t in printed)
    requests = [line for t in printed for line in t.splitlines() if ' HTTP/1.1" ' in line]  # a server's access log
    assert not requests, f"{len(requests)} request log lines, e.g. {requests[0]}"
