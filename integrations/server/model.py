"""The model behind the server: loading (hf_tensorizer or stock Hugging Face) and request execution.

:class:`ModelRunner` owns one model — a transformers causal LM with its tokenizer, or a diffusers pipeline —
and runs every request on one worker thread, so concurrent HTTP requests never share the model at once.
Request bodies are validated here (:class:`BadRequest` becomes an HTTP 400 with its message).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_tensorizer.constants import KEY_ENV
from hf_tensorizer.errors import MissingKeyError, UsageError
from hf_tensorizer.sources import redact

log = logging.getLogger("integrations.server")

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOADERS = ("hf_tensorizer", "hf")
# A prompt longer than this many characters per allowed token is refused before it is tokenized: no tokenizer
# turns 16 characters into less than one token in practice, and the check costs nothing on the event loop.
CHARS_PER_TOKEN = 16


class BadRequest(ValueError):
    """A request the model cannot run as given (the server answers 400 with this message)."""


@dataclass
class ServerConfig:
    """What ``python -m integrations.server`` was started with (see ``__main__.py`` for the flags)."""

    model_uri: str
    model_name: str = "model"
    precision: str = "float32"
    device: str = "cpu"
    loader: str = "hf_tensorizer"
    key_file: str | None = None
    tensorizer_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens_limit: int = 512
    max_steps_limit: int = 200
    max_instances: int = 64
    # prompt tokens accepted; 0: the model's maximum positions (a larger value is lowered to that too)
    max_input_tokens: int = 0
    # >0: a predict request arriving while the weights load waits up to this long instead of getting 503
    # (what Knative's activator does for a service scaled from zero); 0: answer 503 at once (KServe's default)
    ready_wait_s: float = 0.0


# Request fields accepted per task, with their validators. Anything else is rejected: a typo in a field name
# must not silently fall back to a default.
def _int_in(lo: int, hi: int) -> Any:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BadRequest(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def _float_in(lo: float, hi: float) -> Any:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise BadRequest(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        return float(v)

    return check


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\\ud800" parses to a lone surrogate no tokenizer can encode
        raise BadRequest(f"{name} is not valid Unicode (a lone surrogate escape)") from None
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {v!r}")
    return v


class ModelRunner:
    """Loads the model once (:meth:`load`) and executes requests one at a time (:meth:`submit`).

    Args:
        config: the server configuration.
    """

    def __init__(self, config: ServerConfig) -> None:
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
        if config.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {config.loader!r}")
        self.config = config
        self.dtype = PRECISIONS[config.precision]
        self.task: str | None = None  # "text-generation" | "text-to-image" once loaded
        self.model: Any = None
        self.tokenizer: Any = None
        self.ready = threading.Event()
        self.finished = threading.Event()  # set when loading ends, whether it worked or not
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.max_positions: int | None = None  # the model's (text encoder's, for pipelines) context length
        self.max_input_tokens = config.max_input_tokens or None  # set from the model once loaded
        # One worker: the model is never used by two requests at the same time (generation mutates caches,
        # pipelines mutate their scheduler); requests queue in arrival order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        lm = _int_in(1, config.max_new_tokens_limit)
        self._fields = {
            "text-generation": {"prompt": _str, "max_new_tokens": lm, "do_sample": _bool, "seed": _int_in(0, 2**63 - 1),
                                "temperature": _float_in(1e-3, 100.0), "top_p": _float_in(0.0, 1.0),
                                "top_k": _int_in(0, 100000), "repetition_penalty": _float_in(0.01, 100.0)},
            "text-to-image": {"prompt": _str, "negative_prompt": _str, "num_inference_steps":
                              _int_in(1, config.max_steps_limit), "guidance_scale": _float_in(0.0, 100.0),
                              "height": _int_in(8, 4096), "width": _int_in(8, 4096), "seed": _int_in(0, 2**63 - 1)},
        }  # fmt: skip

    # ---- loading ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the weights; sets :attr:`ready` on success, :attr:`error` (and re-raises) on failure."""
        start = time.perf_counter()
        try:
            if self.config.loader == "hf_tensorizer":
                self._load_tensorized()
            else:
                self._load_stock()
            self._set_limits()
        except BaseException as exc:
            reason = exc
            if isinstance(exc, MissingKeyError):  # the library's advice names Python's encryption= argument
                reason = exc.advise(f"start the server with --key-file PATH or set {KEY_ENV}")
            self.error = f"{type(reason).__name__}: {reason}"
            self.finished.set()
            if reason is not exc:
                raise reason from None
            raise
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s (%s, %s) in %.2f s", redact(self.config.model_uri), self.task, self.config.precision,
                 self.load_seconds)  # fmt: skip
        self.ready.set()
        self.finished.set()

    def _options(self) -> dict[str, Any]:
        options = dict(self.config.tensorizer_options)
        if self.config.key_file:
            from hf_tensorizer.crypto import EncryptionKey

            options["encryption"] = EncryptionKey.from_file(self.config.key_file)
        return options

    def _load_tensorized(self) -> None:
        from hf_tensorizer.integrations.artifact.cache import resolve
        from hf_tensorizer.integrations.artifact.layout import WEIGHTS_NAME
        from hf_tensorizer.integrations.artifact.routing import is_artifact, looks_like_uri
        from hf_tensorizer.integrations.options import TensorizerOptions

        options = TensorizerOptions.parse(self._options())
        transport = options.transport
        uri = self.config.model_uri
        if not looks_like_uri(uri) and not (is_artifact(uri) or os.path.isfile(os.path.join(uri, "model_index.json"))):
            raise UsageError(f"{uri} is not a tensorized artifact (no {WEIGHTS_NAME} or model_index.json)")
        folder = resolve(uri, **transport)  # the small files (configs, tokenizer), never the weights
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            from diffusers import DiffusionPipeline

            import hf_tensorizer

            hf_tensorizer.enable()  # every component (UNet, VAE, text encoder) streams through the hooks
            pipe = DiffusionPipeline.from_pretrained(uri, torch_dtype=self.dtype, tensorizer_options=options)
            self._set_pipeline(pipe)
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hf_tensorizer

        hf_tensorizer.enable()
        _check_causal_lm(folder, uri)
        # the fetched folder, not the URI: its marker names the (pinned) weights, so nothing is fetched twice
        self.model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=self.dtype, device_map=self.config.device, tensorizer_options=options,
            output_loading_info=True,
        )  # fmt: skip
        _check_complete(info, uri)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.task = "text-generation"

    def _load_stock(self) -> None:
        """Plain Hugging Face: a local model folder (safetensors) or a Hub repo id, hf_tensorizer not involved."""
        uri = self.config.model_uri
        if self.config.tensorizer_options or self.config.key_file:
            raise UsageError("--tensorizer-option and --key-file need --loader hf_tensorizer")
        if os.path.isfile(os.path.join(uri, "model_index.json")) or _hub_file_exists(uri, "model_index.json"):
            from diffusers import DiffusionPipeline

            self._set_pipeline(DiffusionPipeline.from_pretrained(uri, torch_dtype=self.dtype))
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            _check_causal_lm(uri, uri)
            self.model, info = AutoModelForCausalLM.from_pretrained(uri, dtype=self.dtype,
                                                                    device_map=self.config.device,
                                                                    output_loading_info=True)  # fmt: skip
            _check_complete(info, uri)
            self.tokenizer = AutoTokenizer.from_pretrained(uri)
            self.task = "text-generation"

    def _set_pipeline(self, pipe: Any) -> None:
        if self.config.device != "cpu":
            pipe = pipe.to(self.config.device)
        pipe.set_progress_bar_config(disable=True)
        self.model = pipe
        self.task = "text-to-image"

    def _set_limits(self) -> None:
        """The context length of the loaded model and the prompt cap derived from it and the flag."""
        if self.task == "text-generation":
            cfg = self.model.config
            positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        else:  # a pipeline: its tokenizer truncates to the text encoder's positions
            positions = getattr(getattr(self.model, "tokenizer", None), "model_max_length", None)
        if not isinstance(positions, int) or not 0 < positions < 10**7:  # tokenizers say 1e30 when unknown
            positions = None
        self.max_positions = positions
        cap = self.config.max_input_tokens or positions
        self.max_input_tokens = min(cap, positions) if cap and positions else cap

    # ---- requests ---------------------------------------------------------------------------------------

    def parse(self, body: Any) -> list[dict[str, Any]]:
        """Validate a KServe V1 body ``{"instances": [...]}``; each instance a prompt string or an object.

        Raises:
            BadRequest: what is wrong with the body.
        """
        if not isinstance(body, Mapping) or "instances" not in body:
            raise BadRequest('body must be a JSON object with "instances": [...]')
        extra = set(body) - {"instances", "parameters"}
        if extra:
            raise BadRequest(f"unknown top-level fields {sorted(extra)}")
        instances, shared = body["instances"], body.get("parameters", {})
        if not isinstance(instances, list) or not instances:
            raise BadRequest('"instances" must be a non-empty list')
        if len(instances) > self.config.max_instances:
            raise BadRequest(f"at most {self.config.max_instances} instances per request, got {len(instances)}")
        if not isinstance(shared, Mapping):
            raise BadRequest('"parameters" must be an object')
        fields = self._fields[self.task or "text-generation"]
        out = []
        for i, inst in enumerate(instances):
            item = {"prompt": inst} if isinstance(inst, str) else inst
            if not isinstance(item, Mapping):
                raise BadRequest(f"instance {i} must be a string or an object, got {type(inst).__name__}")
            item = {**shared, **item}
            unknown = set(item) - set(fields)
            if unknown:
                raise BadRequest(f"instance {i}: unknown fields {sorted(unknown)}; accepted: {sorted(fields)}")
            if "prompt" not in item:
                raise BadRequest(f'instance {i}: "prompt" is required')
            inst_out = {k: fields[k](f"instance {i}: {k}", v) for k, v in item.items()}
            self._check_length(i, inst_out)
            out.append(inst_out)
        return out

    def _check_length(self, i: int, inst: Mapping[str, Any]) -> None:
        """Refuse prompts far longer than the cap before any tokenizer sees them (the cheap, coarse check)."""
        cap = self.max_input_tokens
        for k in ("prompt", "negative_prompt"):
            if cap and k in inst and len(inst[k]) > cap * CHARS_PER_TOKEN:
                raise BadRequest(f"instance {i}: {k} has {len(inst[k]):,} characters; at most "
                                 f"{cap * CHARS_PER_TOKEN:,} ({cap} tokens) are accepted")  # fmt: skip

    def submit(self, instances: list[dict[str, Any]]) -> Future[list[dict[str, Any]]]:
        """Queue validated instances on the model thread; the future holds the predictions."""
        run = self._generate if self.task == "text-generation" else self._images
        return self._executor.submit(run, instances)

    @torch.inference_mode()
    def _generate(self, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
        encoded = [self._encode(i, inst) for i, inst in enumerate(instances)]  # every check before any work
        out = []
        for inst, ids in zip(instances, encoded, strict=True):
            # one prompt at a time: no padding, so each answer equals an unbatched in-process generate()
            ids = ids.to(self.model.device)
            kwargs = {k: inst[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
                      if k in inst}  # fmt: skip
            if kwargs.get("do_sample"):
                torch.manual_seed(inst.get("seed", 0))
            else:
                kwargs["do_sample"] = False
            new = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=inst.get("max_new_tokens", 16),
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **kwargs)[0, ids.shape[1]:].tolist()  # fmt: skip
            out.append({"text": self.tokenizer.decode(new, skip_special_tokens=True), "output_ids": new,
                        "prompt_tokens": int(ids.shape[1])})  # fmt: skip
        return out

    def _encode(self, i: int, inst: Mapping[str, Any]) -> torch.Tensor:
        ids = self.tokenizer(inst["prompt"], return_tensors="pt")["input_ids"]
        n, new = ids.shape[1], inst.get("max_new_tokens", 16)
        if n == 0:
            raise BadRequest(f"instance {i}: prompt encodes to zero tokens")
        if self.max_input_tokens and n > self.max_input_tokens:
            raise BadRequest(f"instance {i}: prompt is {n} tokens; at most {self.max_input_tokens} are accepted")
        if self.max_positions and n + new > self.max_positions:
            raise BadRequest(f"instance {i}: {n} prompt tokens + max_new_tokens {new} exceed the model's "
                             f"{self.max_positions} positions")  # fmt: skip
        return ids

    @torch.inference_mode()
    def _images(self, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for inst in instances:
            args = {k: v for k, v in inst.items() if k != "seed"}
            gen = torch.Generator(device="cpu").manual_seed(inst.get("seed", 0))
            image = self.model(**args, generator=gen, output_type="pil").images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append({"image_b64": base64.b64encode(buf.getvalue()).decode("ascii"), "format": "png",
                        "width": image.width, "height": image.height})  # fmt: skip
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_causal_lm(folder: str, uri: str) -> None:
    """Refuse, before any weight is read, a config whose architecture is not a causal LM: AutoModelForCausalLM
    would build one around it (``BertModel`` -> ``BertLMHeadModel``) with a randomly initialised head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = AutoConfig.from_pretrained(folder).architectures or []
    lms = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in lms or a.endswith("ForCausalLM") for a in archs):
        raise UsageError(f"{redact(uri)} holds a {', '.join(archs)}, not a causal language model: served as text "
                         "generation its LM head would be random; serialize a *ForCausalLM model")  # fmt: skip


def _check_complete(info: Mapping[str, Any], uri: str) -> None:
    """Refuse a model some of whose weights the artifact lacks (they would be random)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UsageError(f"{redact(uri)} lacks weights the model needs, which would be random: "
                         f"{', '.join(missing[:5])}{more}")  # fmt: skip


def _hub_file_exists(repo_id: str, name: str) -> bool:
    """For ``--loader hf`` with a Hub repo id: does the repo hold ``name``? (Local folders never reach here.)"""
    if os.path.isdir(repo_id) or repo_id.count("/") != 1:
        return False
    try:
        from huggingface_hub import HfApi

        return name in HfApi().list_repo_files(repo_id)
    except Exception:  # not a repo, no access: the transformers load below reports the real error
        return False


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (``num_readers=8``, ``mmap=true``) or a plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
