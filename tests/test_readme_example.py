"""The README's "Use" example, run verbatim: it must be true as written (a meta-device model filled by
``load_into_module`` computes exactly what the written model computes, nothing left on meta)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

README = Path(__file__).resolve().parent.parent / "README.md"


def use_example() -> str:
    """The first python block under the README's "## Use" heading."""
    text = README.read_text()
    section = text[text.index("\n## Use\n") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README ## Use has no python block"
    return match.group(1)


def test_readme_use_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes model.tensors in the working directory
    torch.manual_seed(0)
    scope: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(use_example(), str(README), "exec"), scope)
    model, empty = scope["model"], scope["empty"]
    assert (tmp_path / "model.tensors").is_file()
    left = [n for n, t in [*empty.named_parameters(), *empty.named_buffers()] if t.is_meta]
    assert left == []
    ids = torch.tensor([[101, 7, 42, 300, 5, 102]])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        got = empty(input_ids=ids.to(scope["device"])).last_hidden_state.cpu()
    assert not got.isnan().any()
    assert torch.equal(got, want)
