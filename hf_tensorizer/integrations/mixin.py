"""``TensorizerMixin``: tensorized load and save for one model class, without the global switch."""

from __future__ import annotations

from typing import Any

from .adapters.transformers.load import load_pretrained
from .adapters.transformers.save import save_tensorized
from .artifact.publish import save_options
from .artifact.routing import is_artifact, looks_like_uri
from .options import KWARG
from .patches import looking_like

SAVE_ARGS = ("tokenizer", "processor", KWARG)


class TensorizerMixin:
    """Put first in the bases of a ``PreTrainedModel`` subclass to give it tensorized load/save without enabling
    the global hook::

        class MyModel(TensorizerMixin, LlamaForCausalLM): ...
        MyModel.from_pretrained("s3://bucket/my-model", device_map="cuda")
        model.save_pretrained("s3://bucket/out", tensorized=True)

    Each subclass shows the stock methods' signatures (diffusers and others inspect them, docs/compat.md).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        below = mro[mro.index(TensorizerMixin) + 1 :] if TensorizerMixin in mro else ()
        for name in ("from_pretrained", "save_pretrained", "push_to_hub"):
            if name in cls.__dict__:
                continue  # the subclass's own method
            stock = next((base.__dict__[name] for base in below if name in base.__dict__), None)
            if stock is not None:
                setattr(cls, name, looking_like(TensorizerMixin.__dict__[name], stock))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *model_args: Any, **kwargs: Any) -> Any:
        if is_artifact(pretrained_model_name_or_path, kwargs.get("subfolder", "") or ""):
            return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        kwargs.pop(KWARG, None)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)  # type: ignore[misc]

    def save_pretrained(self, save_directory: Any, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
        if tensorized or looks_like_uri(save_directory):
            return save_tensorized(self, save_directory, **save_options(kwargs, SAVE_ARGS))
        return super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]

    def push_to_hub(self, repo_id: str, *args: Any, tensorized: bool = False, **kwargs: Any) -> Any:
        if tensorized:
            from .push import push_to_hub

            return push_to_hub(self, repo_id, **kwargs)
        return super().push_to_hub(repo_id, *args, **kwargs)  # type: ignore[misc]
