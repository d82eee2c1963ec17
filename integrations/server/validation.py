"""Request validation: KServe V1 bodies and V2 (Open Inference Protocol) requests into checked instances.

Every field is checked before any work is queued: an unknown field (a typo never falls back to a default), a
value out of range, a prompt far over the input cap, more work in one request than ``max_request_tokens`` /
``max_request_steps`` allow. :class:`BadRequest` becomes an HTTP 400 with its message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# A prompt longer than this many characters per allowed token is refused before it is tokenized: no tokenizer
# turns 16 characters into less than one token in practice, and the check costs nothing on the event loop.
CHARS_PER_TOKEN = 16
DEFAULT_NEW_TOKENS = 16
DEFAULT_STEPS = 50  # diffusers' default num_inference_steps


class BadRequest(ValueError):
    """A request the model cannot run as given (the server answers 400 with this message)."""


Check = Callable[[str, Any], Any]


def int_in(lo: int, hi: int) -> Check:
    """A validator for an integer (not a bool) in ``[lo, hi]``."""

    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BadRequest(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def float_in(lo: float, hi: float) -> Check:
    """A validator for a number (not a bool) in ``[lo, hi]``."""

    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise BadRequest(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        return float(v)

    return check


def text(name: str, v: Any) -> str:
    """A validator for a string that UTF-8 can encode."""
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\\ud800" parses to a lone surrogate no tokenizer can encode
        raise BadRequest(f"{name} is not valid Unicode (a lone surrogate escape)") from None
    return v


def flag(name: str, v: Any) -> bool:
    """A validator for ``true``/``false``."""
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {v!r}")
    return v


def task_fields(max_new_tokens: int, max_steps: int) -> dict[str, dict[str, Check]]:
    """The accepted fields per task and their validators."""
    seed = int_in(0, 2**63 - 1)
    return {
        "text-generation": {"prompt": text, "max_new_tokens": int_in(1, max_new_tokens), "do_sample": flag,
                            "seed": seed, "temperature": float_in(1e-3, 100.0), "top_p": float_in(0.0, 1.0),
                            "top_k": int_in(0, 100000), "repetition_penalty": float_in(0.01, 100.0)},
        "text-to-image": {"prompt": text, "negative_prompt": text, "num_inference_steps": int_in(1, max_steps),
                          "guidance_scale": float_in(0.0, 100.0), "height": int_in(8, 4096),
                          "width": int_in(8, 4096), "seed": seed},
    }  # fmt: skip


def parse_v1(
    body: Any,
    fields: Mapping[str, Check],
    *,
    max_instances: int,
    input_cap: int | None,
    work_cap: tuple[str, int, int],
) -> list[dict[str, Any]]:
    """Validate a KServe V1 body ``{"instances": [...], "parameters": {...}}``.

    Args:
        body: the decoded JSON body.
        fields: the task's accepted fields (:func:`task_fields`).
        max_instances: most instances in one request.
        input_cap: longest prompt in tokens (the coarse character check uses it), or None.
        work_cap: ``(field, default, cap)``: the sum of ``field`` over the instances may not exceed ``cap``.

    Returns:
        The checked instances, one dict per instance, shared parameters merged in.

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
    if len(instances) > max_instances:
        raise BadRequest(f"at most {max_instances} instances per request, got {len(instances)}")
    if not isinstance(shared, Mapping):
        raise BadRequest('"parameters" must be an object')
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
        checked = {k: fields[k](f"instance {i}: {k}", v) for k, v in item.items()}
        _check_length(i, checked, input_cap)
        out.append(checked)
    key, default, cap = work_cap
    work = sum(inst.get(key, default) for inst in out)
    if work > cap:  # one request may not hold the model thread for longer than this much work
        raise BadRequest(f"the request asks for {work:,} {key} in total (over its instances); at most {cap:,} "
                         "per request are accepted: split it")  # fmt: skip
    return out


def _check_length(i: int, inst: Mapping[str, Any], cap: int | None) -> None:
    """Refuse prompts far longer than the cap before any tokenizer sees them (the cheap, coarse check)."""
    for k in ("prompt", "negative_prompt"):
        if cap and k in inst and len(inst[k]) > cap * CHARS_PER_TOKEN:
            raise BadRequest(f"instance {i}: {k} has {len(inst[k]):,} characters; at most "
                             f"{cap * CHARS_PER_TOKEN:,} ({cap} tokens) are accepted")  # fmt: skip


V2_TEXT_INPUTS = ("prompt", "negative_prompt")


def v2_to_v1(inputs: list[tuple[str, str, list[Any]]], parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """An Open Inference Protocol request as the V1 body :func:`parse_v1` checks.

    ``prompt`` (and, for pipelines, ``negative_prompt``) are ``BYTES`` inputs with one element per instance; every
    other field goes in the request's ``parameters`` and applies to every instance.

    Args:
        inputs: ``(name, datatype, flat data)`` per input tensor.
        parameters: the request's parameters (plain values).

    Raises:
        BadRequest: an unknown input, a non-``BYTES`` one, inputs of different lengths.
    """
    columns: dict[str, list[str]] = {}
    for name, datatype, data in inputs:
        if name not in V2_TEXT_INPUTS:
            raise BadRequest(f"unknown input {name!r}; inputs are {list(V2_TEXT_INPUTS)}, other fields go in "
                             "the request's \"parameters\"")  # fmt: skip
        if datatype != "BYTES":
            raise BadRequest(f"input {name!r} must have datatype BYTES, got {datatype}")
        if name in columns:
            raise BadRequest(f"input {name!r} given twice")
        columns[name] = [_as_text(name, v) for v in data]
    if "prompt" not in columns:
        raise BadRequest('an input named "prompt" (datatype BYTES, one element per prompt) is required; '
                         "other fields go in the request's \"parameters\"")  # fmt: skip
    n = len(columns["prompt"])
    if any(len(col) != n for col in columns.values()):
        raise BadRequest("every input must have one element per prompt")
    instances = [{name: col[i] for name, col in columns.items()} for i in range(n)]
    return {"instances": instances, "parameters": dict(parameters or {})}


def _as_text(name: str, v: Any) -> Any:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r} is not UTF-8") from None
    return v  # strings pass; anything else is reported by the field's validator
