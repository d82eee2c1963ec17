"""The model behind the server: loading (hf_tensorizer or stock Hugging Face) and request execution.

:class:`ModelRunner` owns one model — a transformers causal LM with its tokenizer, or a diffusers pipeline —
and runs every request on one worker thread, so concurrent requests never share the model at once. Work is
stoppable: every generated token (every denoising step) checks the request's cancel flag and deadline, so a
request whose client hung up, or that ran past ``request_timeout_s``, gives the thread back at once.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from hf_tensorizer.constants import KEY_ENV
from hf_tensorizer.errors import MissingKeyError, ObjectChangedError, UsageError
from hf_tensorizer.sources import redact

from .config import LOADERS, PRECISION_NAMES, ServerConfig
from .snapshot import Snapshot, SnapshotError, reason_not_to, take_lease
from .validation import DEFAULT_NEW_TOKENS, DEFAULT_STEPS, BadRequest, parse_v1, task_fields

if TYPE_CHECKING:
    from hf_tensorizer.engine.lease import FileLease

log = logging.getLogger("integrations.server")

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert set(PRECISIONS) == set(PRECISION_NAMES)


class Cancelled(Exception):
    """The request's client disconnected: its work was stopped (or never started)."""


class DeadlineExceeded(Exception):
    """The request ran longer than ``request_timeout_s`` and was stopped."""


class ModelRunner:
    """Loads the model once (:meth:`load`) and executes requests one at a time (:meth:`submit`).

    Args:
        config: the server configuration.
        snapshot: a weights snapshot started already (by the CLI, before its imports); ``None``: the load takes
            one itself when ``config.snapshot`` and the model allow it (:func:`~.snapshot.reason_not_to`) and no
            read lease can be had.
        lease: a read lease on the weights file taken already (:func:`~.snapshot.take_lease`, by the CLI); ``None``
            and no ``snapshot``: the load tries to take one itself when ``config.lease`` allows.
        no_lease: why the CLI could not take a lease (logged once by the load).
    """

    def __init__(self, config: ServerConfig, snapshot: Snapshot | None = None, *, lease: FileLease | None = None,
                 no_lease: str | None = None) -> None:  # fmt: skip
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
        if config.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {config.loader!r}")
        self.config = config
        self.snapshot = snapshot
        self.snapshot_used = False  # the weights were loaded from the snapshot (else read from the source)
        self.lease = lease
        self.lease_used = False  # the weights map the file itself, under the read lease
        self._no_lease = no_lease
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
        self._fields = task_fields(config.max_new_tokens_limit, config.max_steps_limit)
        self._done_callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

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
            self._finish()
            if reason is not exc:
                raise reason from None
            raise
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s (%s, %s) in %.2f s", redact(self.config.model_uri), self.task, self.config.precision,
                 self.load_seconds)  # fmt: skip
        self.ready.set()
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            self.finished.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for fn in callbacks:
            fn()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (from the loading thread) once loading has ended, or now if it already has."""
        with self._lock:
            if not self.finished.is_set():
                self._done_callbacks.append(fn)
                return
        fn()

    def _options(self, mapped: bool = False) -> dict[str, Any]:
        # Every way, a rewrite or truncation of the artifact file cannot change (or SIGBUS) the running model: the
        # file mapped under a read lease or a sealed snapshot mapped (default strategy: zero-copy), or pread's copy
        options = {**({} if mapped else {"strategy": "pread"}), **self.config.tensorizer_options}
        if self.config.key_file:
            from hf_tensorizer.crypto import EncryptionKey

            options["encryption"] = EncryptionKey.from_file(self.config.key_file)
        return options

    def _load_tensorized(self) -> None:
        from hf_tensorizer.integrations.artifact.cache import resolve
        from hf_tensorizer.integrations.artifact.layout import WEIGHTS_NAME
        from hf_tensorizer.integrations.artifact.routing import is_artifact, looks_like_uri
        from hf_tensorizer.integrations.options import TensorizerOptions

        uri = self.config.model_uri
        if self._leased():
            self._load_causal_lm(uri, uri, TensorizerOptions.parse(self._options(mapped=True)))
            if self.lease is not None and self.lease.broken.is_set():
                raise ObjectChangedError(f"{redact(uri)}: model.tensors was opened for writing during the load")
            self.lease_used = True
            return
        shadow = self._snapshot_folder()
        if shadow is not None:
            try:
                self._load_causal_lm(shadow, uri, TensorizerOptions.parse(self._options(mapped=True)))
            finally:
                self.snapshot.close()  # type: ignore[union-attr]  # the tensors keep their mapping alive
            self.snapshot_used = True
            return
        options = TensorizerOptions.parse(self._options())
        transport = options.transport
        if not looks_like_uri(uri) and not (is_artifact(uri) or os.path.isfile(os.path.join(uri, "model_index.json"))):
            raise UsageError(f"{uri} is not a tensorized artifact (no {WEIGHTS_NAME} or model_index.json)")
        folder = resolve(uri, **transport)  # the small files (configs, tokenizer), never the weights
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            from diffusers import DiffusionPipeline

            import hf_tensorizer

            hf_tensorizer.enable()  # every component (UNet, VAE, text encoder) streams through the hooks
            pipe = DiffusionPipeline.from_pretrained(uri, **_diffusers_dtype(self.dtype), tensorizer_options=options)
            self._set_pipeline(pipe)
            return
        self._load_causal_lm(folder, uri, options)

    def _leased(self) -> bool:
        """Whether the weights file is held under a read lease (taken by the CLI, or here), so the load may map it."""
        c = self.config
        if self.lease is None:
            if self.snapshot is not None or not c.snapshot or self._no_lease:  # the CLI decided already
                if self._no_lease:
                    log.info("no read lease on %s (%s)", redact(c.model_uri), self._no_lease)
                return False
            if not c.lease or reason_not_to(c.model_uri, loader=c.loader, device=c.device, key_file=c.key_file,
                                            tensorizer_options=c.tensorizer_options) is not None:  # fmt: skip
                return False
            self.lease, why = take_lease(c.model_uri)
            if self.lease is None:
                log.info("no read lease on %s (%s)", redact(c.model_uri), why)
                return False
        log.info("weights of %s mapped under a read lease: a writer waits while they move to private memory",
                 redact(c.model_uri))  # fmt: skip
        return True

    def _snapshot_folder(self) -> str | None:
        """The snapshot's folder to load from, or ``None`` (no snapshot: why is logged once)."""
        c = self.config
        if self.snapshot is None:
            why = "--no-snapshot" if not c.snapshot else reason_not_to(
                c.model_uri, loader=c.loader, device=c.device, key_file=c.key_file,
                tensorizer_options=c.tensorizer_options)  # fmt: skip
            if why is not None:
                log.info("weights read from %s (no snapshot: %s)", redact(c.model_uri), why)
                return None
            self.snapshot = Snapshot(c.model_uri).start()
        try:
            folder = self.snapshot.wait()
        except SnapshotError as exc:  # no memory for the copy, the file changed while copied: read it instead
            log.warning("%s; reading %s with pread instead", exc, redact(c.model_uri))
            self.snapshot.close()
            return None
        log.info("weights snapshot of %s: %.2f GB in %.2f s", redact(c.model_uri), self.snapshot.size / 1e9,
                 self.snapshot.seconds or 0.0)  # fmt: skip
        return folder

    def _load_causal_lm(self, folder: str, uri: str, options: Any) -> None:
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

            self._set_pipeline(DiffusionPipeline.from_pretrained(uri, **_diffusers_dtype(self.dtype)))
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
        """Validate a KServe V1 body ``{"instances": [...], "parameters": {...}}`` for the loaded task.

        Raises:
            BadRequest: what is wrong with the body.
        """
        c = self.config
        task = self.task or "text-generation"
        work = (("max_new_tokens", DEFAULT_NEW_TOKENS, c.max_request_tokens) if task == "text-generation"
                else ("num_inference_steps", DEFAULT_STEPS, c.max_request_steps))  # fmt: skip
        return parse_v1(body, self._fields[task], max_instances=c.max_instances, input_cap=self.max_input_tokens,
                        work_cap=work)  # fmt: skip

    def submit(
        self, instances: list[dict[str, Any]], cancel: threading.Event | None = None, deadline: float | None = None
    ) -> Future[list[dict[str, Any]]]:
        """Queue validated instances on the model thread; the future holds the predictions.

        Args:
            instances: from :meth:`parse`.
            cancel: once set, the work stops at the next token / step (or never starts): :class:`Cancelled`.
            deadline: a ``time.monotonic()`` after which the work stops: :class:`DeadlineExceeded`.
        """
        run = self._generate if self.task == "text-generation" else self._images
        stop = _Stop(cancel or threading.Event(), deadline)
        return self._executor.submit(run, instances, stop)

    @torch.inference_mode()
    def _generate(self, instances: list[dict[str, Any]], stop: _Stop) -> list[dict[str, Any]]:
        from transformers import StoppingCriteriaList

        stop.check()  # cancelled while queued: no work at all
        encoded = [self._encode(i, inst) for i, inst in enumerate(instances)]  # every check before any work
        out = []
        for inst, ids in zip(instances, encoded, strict=True):
            stop.check()
            # one prompt at a time: no padding, so each answer equals an unbatched in-process generate()
            ids = ids.to(self.model.device)
            kwargs = {k: inst[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
                      if k in inst}  # fmt: skip
            if kwargs.get("do_sample"):
                torch.manual_seed(inst.get("seed", 0))
            else:
                kwargs["do_sample"] = False
            new = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=inst.get("max_new_tokens", 16),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                **kwargs,
            )
            new = new[0, ids.shape[1]:].tolist()  # fmt: skip
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
    def _images(self, instances: list[dict[str, Any]], stop: _Stop) -> list[dict[str, Any]]:
        import inspect

        stop.check()
        steps = "callback_on_step_end" in inspect.signature(self.model.__call__).parameters
        out = []
        for inst in instances:
            stop.check()
            args = {k: v for k, v in inst.items() if k != "seed"}
            if steps:  # checked after every denoising step
                args["callback_on_step_end"] = stop.on_step_end
            gen = torch.Generator(device="cpu").manual_seed(inst.get("seed", 0))
            image = self.model(**args, generator=gen, output_type="pil").images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append({"image_b64": base64.b64encode(buf.getvalue()).decode("ascii"), "format": "png",
                        "width": image.width, "height": image.height})  # fmt: skip
        return out

    def shutdown(self) -> None:
        """Drop queued work; the running request finishes (it is stopped by its own cancel flag)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Stop:
    """A request's stop condition, checked between instances, per generated token and per denoising step."""

    def __init__(self, cancel: threading.Event, deadline: float | None) -> None:
        self.cancel = cancel
        self.deadline = deadline

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("the client disconnected")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the request ran past its time limit")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # a transformers StoppingCriteria: raising ends generate() at once (its partial output is dropped)
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.check()
        return callback_kwargs


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


def _diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword this diffusers takes: ``dtype`` where it replaced ``torch_dtype`` (which then warns at
    every load), ``torch_dtype`` in older releases."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _hub_file_exists(repo_id: str, name: str) -> bool:
    """For ``--loader hf`` with a Hub repo id: does the repo hold ``name``? (Local folders never reach here.)"""
    if os.path.isdir(repo_id) or repo_id.count("/") != 1:
        return False
    try:
        from huggingface_hub import HfApi

        return name in HfApi().list_repo_files(repo_id)
    except Exception:  # not a repo, no access: the transformers load below reports the real error
        return False
