"""Publishing tensorized artifacts to the Hugging Face Hub (``push_to_hub``), with a model card.

The artifact is staged in a temporary folder and uploaded in one commit (``HfApi.upload_folder``), so a
repository never shows a half-uploaded artifact. Load it back with ``from_pretrained("hf://org/repo")``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from ..errors import SinkError, UsageError

TAG = "hf_tensorizer"


def model_card(repo_id: str, *, library: str, base_card: str | None = None, tags: list[str] | None = None) -> str:
    """A README.md for a tensorized artifact: metadata tagged ``hf_tensorizer`` plus loading instructions."""
    from huggingface_hub import ModelCard, ModelCardData

    all_tags = [TAG, *(t for t in (tags or []) if t != TAG)]
    if base_card:  # keep an existing card's text, add our tag
        card = ModelCard(base_card)
        existing = list(card.data.tags or [])
        card.data.tags = existing + [t for t in all_tags if t not in existing]
        return str(card)
    data = ModelCardData(library_name=library, tags=all_tags)
    loader = "DiffusionPipeline" if library == "diffusers" else "AutoModel"
    body = f"""
# {repo_id} (tensorized)

These weights are stored as one [hf_tensorizer](https://github.com/) file (`model.tensors`) that streams straight
to the GPU. Configuration and tokenizer files are the usual ones.

```python
import hf_tensorizer
from {library} import {loader}

hf_tensorizer.enable()
model = {loader}.from_pretrained("hf://{repo_id}", device_map="cuda")
```
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def push_to_hub(
    obj: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    **serializer_options: Any,
) -> Any:
    """Upload ``obj`` (a transformers model, diffusers model or pipeline) as a tensorized artifact.

    Args:
        obj: what to publish.
        repo_id: ``org/name``; created when missing.
        tokenizer: transformers only, saved alongside.
        processor: transformers only, saved alongside.
        token: a Hub token with write access (default: the saved login / ``HF_TOKEN``).
        endpoint: the Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        private: visibility of a repository created here.
        revision: the branch to commit to.
        commit_message: default ``"Upload tensorized artifact with hf_tensorizer"``.
        create_pr: open a pull request instead.
        tags: extra model card tags (``hf_tensorizer`` is always there).
        **serializer_options: :class:`~hf_tensorizer.TensorSerializer` arguments.

    Returns:
        huggingface_hub's ``CommitInfo``.

    Raises:
        UsageError: ``obj`` is of no supported type; SinkError: the upload failed.
    """
    from huggingface_hub import HfApi

    from ..sources.hub_repo import hub_endpoint

    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    library, save = _saver(obj, tokenizer=tokenizer, processor=processor)
    folder = tempfile.mkdtemp(prefix="hf_tensorizer-push-")
    try:
        save(folder, **serializer_options)
        try:
            _ensure_repo(api, repo_id, private)
            existing = _existing_card(api, repo_id, revision)
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(repo_id, library=library, base_card=existing, tags=tags))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or "Upload tensorized artifact with hf_tensorizer",
                create_pr=create_pr,
            )
        except Exception as exc:  # huggingface_hub raises its own HTTP errors; give callers our type
            raise SinkError(f"push to hf://{repo_id} failed: {exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ensure_repo(api: Any, repo_id: str, private: bool | None) -> None:
    """Create ``repo_id`` only when it does not exist (a token may be allowed to write but not to create)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)


def _existing_card(api: Any, repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision)
    except (EntryNotFoundError, OSError, ValueError):
        return None
    except Exception:  # a missing README on a fresh repo surfaces as several error types
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _saver(obj: Any, *, tokenizer: Any, processor: Any) -> tuple[str, Any]:
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError:  # diffusers is optional
        DiffusionPipeline = ModelMixin = ()  # type: ignore[assignment,misc]
    if DiffusionPipeline and isinstance(obj, DiffusionPipeline):
        from .diffusers import save_pipeline

        return "diffusers", lambda folder, **kw: save_pipeline(obj, folder, **kw)
    if ModelMixin and isinstance(obj, ModelMixin):
        from .diffusers import save_model

        return "diffusers", lambda folder, **kw: save_model(obj, folder, **kw)
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel):
        from .transformers_save import save_tensorized

        return "transformers", lambda folder, **kw: save_tensorized(
            obj, folder, tokenizer=tokenizer, processor=processor, **kw
        )
    raise UsageError(f"cannot push a {type(obj).__name__}: expected a transformers or diffusers model or pipeline")
