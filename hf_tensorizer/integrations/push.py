"""Publishing tensorized artifacts to the Hugging Face Hub (``push_to_hub``), with a model card.

The artifact is staged in a temporary folder and uploaded in one commit (``HfApi.upload_folder``), so a
repository never shows a half-uploaded artifact. Load it back with ``from_pretrained("org/repo")`` (hooks on) or
``from_pretrained("hf://org/repo")``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from ..errors import SinkError, UsageError

TAG = "hf_tensorizer"
TAGS = (TAG, "tensorized")
CARD_SECTION = "## Load with hf_tensorizer"
# The Auto class a snippet names, most specific first: the first whose mapping gives the model's own class
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)


def loader_for(obj: Any) -> str:
    """The class a user loads ``obj`` back with: an Auto class that gives ``type(obj)`` for its config (or the
    class itself, when transformers or diffusers exports it), ``DiffusionPipeline`` for pipelines."""
    name = type(obj).__name__
    if type(obj).__module__.startswith("diffusers"):
        import diffusers

        if isinstance(obj, diffusers.DiffusionPipeline):
            return "DiffusionPipeline"
        return name if hasattr(diffusers, name) else "DiffusionPipeline"
    from transformers.models.auto import modeling_auto

    model_type = getattr(getattr(obj, "config", None), "model_type", None)
    for mapping, auto in _AUTO_CLASSES:
        target = getattr(modeling_auto, mapping, {}).get(model_type)
        if target == name or (isinstance(target, tuple) and name in target):
            return auto
    import transformers

    return name if hasattr(transformers, name) else "AutoModel"


def _section(repo_id: str, library: str, loader: str) -> str:
    return f"""{CARD_SECTION}

The weights are one hf_tensorizer file (`model.tensors`) that streams
straight to the GPU (or CPU), chunk by chunk, without a copy through local disk; the configuration and tokenizer
files are the usual ones. With hf_tensorizer's hooks on, the usual `{library}` call loads it:

```python
import hf_tensorizer
from {library} import {loader}

hf_tensorizer.enable()
model = {loader}.from_pretrained("{repo_id}", device_map="auto")
```

`revision=`, `subfolder=`, `token=`, `cache_dir=` and `local_files_only=` mean what they mean for any Hub model,
and `hf://{repo_id}` is the same artifact as a URI. Without `hf_tensorizer.enable()`, {library} finds no
safetensors weights in this repository.
"""


def model_card(
    repo_id: str,
    *,
    library: str,
    base_card: str | None = None,
    tags: list[str] | None = None,
    loader: str | None = None,
) -> str:
    """A README.md for a tensorized artifact: metadata that finds it, and how to load it.

    ``library_name`` stays the model's library (``transformers`` / ``diffusers``): the Hub then shows its task,
    widgets and a "Use this model" snippet that works with the hooks on; the tags ``hf_tensorizer`` and
    ``tensorized`` list every artifact (``huggingface.co/models?other=hf_tensorizer``). The card's section
    "Load with hf_tensorizer" holds a snippet that runs as written.

    Args:
        repo_id: ``org/name``, as the snippet loads it.
        library: ``"transformers"`` or ``"diffusers"``.
        base_card: an existing README.md: its text and metadata stay; the tags are added, and the section when
            it is not there yet.
        tags: more tags.
        loader: the class the snippet calls (default ``AutoModel`` / ``DiffusionPipeline``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    all_tags = [*TAGS, *(t for t in (tags or []) if t not in TAGS)]
    loader = loader or ("DiffusionPipeline" if library == "diffusers" else "AutoModel")
    if base_card:  # keep an existing card's text, add our tags (and our section once)
        card = ModelCard(base_card)
        existing = list(card.data.tags or [])
        card.data.tags = existing + [t for t in all_tags if t not in existing]
        if not card.data.library_name:
            card.data.library_name = library
        if CARD_SECTION not in card.text:
            card.text = card.text.rstrip("\n") + "\n\n" + _section(repo_id, library, loader)
        return str(card)
    data = ModelCardData(library_name=library, tags=all_tags)
    body = f"\n# {repo_id} (tensorized)\n\n{_section(repo_id, library, loader)}"
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
        tags: extra model card tags (``hf_tensorizer`` and ``tensorized`` are always there).
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
    loader = loader_for(obj)
    folder = tempfile.mkdtemp(prefix="hf_tensorizer-push-")
    try:
        save(folder, **serializer_options)
        try:
            _ensure_repo(api, repo_id, private)
            existing = _existing_card(api, repo_id, revision)
            with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(repo_id, library=library, base_card=existing, tags=tags, loader=loader))
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
    # only an imported diffusers can have made obj: a transformers model never pays diffusers' import (2-4 s)
    diffusers = sys.modules.get("diffusers")
    DiffusionPipeline = getattr(diffusers, "DiffusionPipeline", ())
    ModelMixin = getattr(diffusers, "ModelMixin", ())
    if DiffusionPipeline and isinstance(obj, DiffusionPipeline):
        from .adapters.diffusers.models import save_pipeline

        return "diffusers", lambda folder, **kw: save_pipeline(obj, folder, **kw)
    if ModelMixin and isinstance(obj, ModelMixin):
        from .adapters.diffusers.models import save_model

        return "diffusers", lambda folder, **kw: save_model(obj, folder, **kw)
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel):
        from .adapters.transformers.save import save_tensorized

        return "transformers", lambda folder, **kw: save_tensorized(
            obj, folder, tokenizer=tokenizer, processor=processor, **kw
        )
    raise UsageError(f"cannot push a {type(obj).__name__}: expected a transformers or diffusers model or pipeline")
