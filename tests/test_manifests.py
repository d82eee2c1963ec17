"""Deployment files (integrations/k8s/*.yaml, integrations/Dockerfile) against the schemas and the code they start.

Core kinds (Secret, Job) are validated against the Kubernetes JSON schemas (``kubernetes-validate``, strict: an
unknown field fails); InferenceServices are built field by field into kserve's own ``V1beta1InferenceService``
model (an unknown field, a wrong type or a missing required one fails). Container commands are parsed with the
real argparse parsers of ``hf-tensorizer`` and of the server; probe paths are checked against the routes KServe's
SDK registers; each image maps to a stage of the Dockerfile that installs what the container runs.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K8S = ROOT / "integrations" / "k8s"
K8S_VERSION = "1.30"

from hf_tensorizer.cli import build_parser as cli_parser  # noqa: E402
from hf_tensorizer.cli.serialize import destination  # noqa: E402
from integrations.server.__main__ import build_parser as server_parser  # noqa: E402


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _all(kind: str) -> list[dict[str, Any]]:
    return [d for d in _docs() if d.get("kind") == kind]


def _parse(parser: Any, argv: list[str]) -> Any:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of rejecting a command line
        raise AssertionError(f"command line rejected by {parser.prog}: {argv}") from exc


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Job" else doc["spec"]["predictor"]
    (container,) = spec["containers"]
    return container


def _command(doc: dict[str, Any]) -> list[str]:
    c = _container(doc)
    return c["command"] + c.get("args", [])


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    for e in container.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.add(ref["name"])
    return refs


def _job_dests() -> set[str]:
    return {destination(_parse(cli_parser(), _command(job)[1:])) for job in _all("Job")}


# ---- schemas ---------------------------------------------------------------------------------------------


def test_every_document_is_well_formed() -> None:
    docs = _docs()
    assert [d["kind"] for d in docs].count("InferenceService") == 2
    assert {d["kind"] for d in docs} == {"Secret", "Job", "InferenceService"}
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


def test_core_kinds_match_the_kubernetes_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for doc in _docs():
        if doc["kind"] != "InferenceService":
            kv.validate(doc, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(_all("Job")[0]))
    bad["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRefs"] = {}
    with pytest.raises(kv.ValidationError):  # the validator does catch a typo
        kv.validate(bad, K8S_VERSION, strict=True)


def _to_model(data: Any, klass: Any, path: str) -> Any:
    """``data`` as an instance of the kserve (or kubernetes) OpenAPI model ``klass``; raises on any field the model
    does not have, a value of the wrong type, or a required field missing (the models' own checks)."""
    import kubernetes.client.models as k8s_models

    from integrations.server._sdk import kserve

    if isinstance(klass, str):
        # the generated models spell containers two ways: list[X] / dict(str, X) and List[X] / Dict[str, X]
        if m := re.fullmatch(r"[lL]ist\[(.*)\]", klass):
            assert isinstance(data, list), f"{path}: expected a list"
            return [_to_model(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(data)]
        if m := re.fullmatch(r"dict\([^,]*, (.*)\)|Dict\[[^,]*, (.*)\]", klass):
            assert isinstance(data, dict), f"{path}: expected a mapping"
            sub = m.group(1) or m.group(2)
            return {k: _to_model(v, sub, f"{path}.{k}") for k, v in data.items()}
        primitive = {"str": str, "int": int, "float": (int, float), "bool": bool}
        if klass in primitive:
            assert isinstance(data, primitive[klass]) and not (klass != "bool" and isinstance(data, bool)), (
                f"{path}: expected {klass}, got {data!r}"
            )
            return data
        if klass in ("object", "datetime", "date"):
            return data
        klass = getattr(kserve.models, klass, None) or getattr(k8s_models, klass)
    assert isinstance(data, dict), f"{path}: expected an object for {klass.__name__}"
    unknown = set(data) - set(klass.attribute_map.values())
    assert not unknown, f"{path}: {klass.__name__} has no field {sorted(unknown)}"
    kwargs = {attr: _to_model(data[key], typ, f"{path}.{key}") for attr, typ in klass.openapi_types.items()
              if (key := klass.attribute_map[attr]) in data}  # fmt: skip
    return klass(**kwargs)


def test_inference_services_match_kserves_model() -> None:
    from integrations.server._sdk import kserve

    for doc in _all("InferenceService"):
        isvc = _to_model(doc, "V1beta1InferenceService", doc["metadata"]["name"])
        assert isinstance(isvc, kserve.V1beta1InferenceService)
        assert isvc.api_version == "serving.kserve.io/v1beta1" and isvc.spec.predictor.containers[0].name
    bad = json.loads(json.dumps(_all("InferenceService")[0]))
    bad["spec"]["predictor"]["containers"][0]["readinesProbe"] = bad["spec"]["predictor"]["containers"][0].pop(
        "readinessProbe"
    )
    with pytest.raises(AssertionError, match="no field"):
        _to_model(bad, "V1beta1InferenceService", "bad")
    bad = json.loads(json.dumps(_all("InferenceService")[0]))
    bad["spec"]["predictor"]["minReplicas"] = "0"
    with pytest.raises(AssertionError, match="expected int"):
        _to_model(bad, "V1beta1InferenceService", "bad")


# ---- commands against the code ------------------------------------------------------------------------------


def test_secret_holds_s3_credentials() -> None:
    (secret,) = _all("Secret")
    data = secret.get("stringData") or secret.get("data") or {}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)


def test_serialization_jobs_run_the_real_cli() -> None:
    (secret,) = _all("Secret")
    for job in _all("Job"):
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
        command = _command(job)
        assert command[0] == "hf-tensorizer"
        args = _parse(cli_parser(), command[1:])
        assert args.command == "serialize" and args.hf_model_id and destination(args).startswith("s3://")
        assert secret["metadata"]["name"] in _secret_refs(_container(job))


def _services(runner: str) -> list[dict[str, Any]]:
    found = [d for d in _all("InferenceService") if _command(d)[0] == runner or _command(d)[2:3] == [runner]]
    assert found, f"no InferenceService runs {runner}"
    return found


def test_predictor_service_runs_the_real_server() -> None:
    from integrations.server.app import route_paths

    (isvc,) = _services("integrations.server")
    container = _container(isvc)
    command = _command(isvc)
    assert command[:3] == ["python3", "-m", "integrations.server"]
    args = _parse(server_parser(), command[3:])
    assert args.model_uri in _job_dests(), "the service must load what a Job writes"
    assert args.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    assert _all("Secret")[0]["metadata"]["name"] in _secret_refs(container)
    # the probes hit routes KServe's SDK registers, on the port the server listens on
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == f"/v1/models/{args.model_name}" and ready["port"] == args.port
    assert live["port"] == args.port and live["path"] in route_paths() and "/v1/models/{model_name}" in route_paths()
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/path"] in route_paths()
    assert isvc["spec"]["predictor"]["containerConcurrency"] <= args.max_queue  # Knative queues, we never shed
    if "cuda" in args.device:
        assert "nvidia.com/gpu" in container["resources"]["limits"]


def test_llm_service_runs_vllm_with_our_load_format() -> None:
    from hf_tensorizer.integrations.options import engine_keys, transport_keys

    (isvc,) = _services("vllm")
    container = _container(isvc)
    command = _command(isvc)
    assert command[:2] == ["vllm", "serve"]
    assert command[2] in _job_dests(), "vLLM must serve what a Job writes"
    opts = {k: v for k, v in zip(command[3::2], command[4::2], strict=True)}  # --flag value pairs
    assert opts["--load-format"] == "hf_tensorizer"
    extra = json.loads(opts["--model-loader-extra-config"])
    assert set(extra) <= engine_keys() | transport_keys(), "options the plugin validates like tensorizer_options"
    port = int(opts["--port"])
    assert opts["--host"] == "0.0.0.0" and [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
    assert _all("Secret")[0]["metadata"]["name"] in _secret_refs(container)


# ---- Dockerfile ----------------------------------------------------------------------------------------------


def _stages() -> dict[str, list[str]]:
    """Dockerfile stages by name, each its instructions (comments dropped, continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "integrations" / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for ln in (ln.strip() for ln in text.splitlines()):
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("FROM "):
            parts = ln.split()
            assert len(parts) == 4 and parts[2] == "AS", f"every stage is named: {ln}"
            current = stages.setdefault(parts[3], [])
        current.append(ln)
    return stages


def _stage_for(image: str) -> list[str]:
    """The stage whose image title label is the image's repository name."""
    title = image.rsplit("/", 1)[-1].split(":")[0]
    found = [s for s in _stages().values() if f"LABEL org.opencontainers.image.title={title}" in s]
    assert len(found) == 1, f"no Dockerfile stage builds {image}"
    return found[0]


def test_dockerfile_stages_install_what_the_manifests_run() -> None:
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for stage in _stages().values():
        for ln in stage:
            if ln.startswith("COPY "):
                for src in shlex.split(ln)[1:-1]:
                    assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
            for wanted in re.findall(r'"\.\[([^\]]*)\]"', ln):  # pip install ".[a,b]": extras that exist
                assert set(wanted.split(",")) <= extras, wanted
    for doc in _docs():
        if doc["kind"] not in ("Job", "InferenceService"):
            continue
        stage, command = _stage_for(_container(doc)["image"]), _command(doc)
        installs = " ".join(ln for ln in stage if ln.startswith("RUN ") and "pip install" in ln)
        assert 'pip install ".[' in installs, "the stage installs hf_tensorizer"
        if command[0] == "python3":  # the predictor: the package with the server extra, the module on the path
            assert '".[all]"' in installs and "COPY integrations ./integrations" in stage
            workdir = next(ln.split()[1] for ln in stage if ln.startswith("WORKDIR "))
            assert f"ENV PYTHONPATH={workdir}" in stage
        elif command[0] == "vllm":  # vLLM comes from the base image, kept as is
            assert stage[0].startswith("FROM vllm/vllm-openai:") and "-c /tmp/base-constraints.txt" in installs
        else:
            assert command[0] == "hf-tensorizer"  # the package's console script
        if doc["kind"] == "InferenceService":
            port = next(int(ln.split()[1]) for ln in stage if ln.startswith("EXPOSE "))
            assert [p["containerPort"] for p in _container(doc)["ports"]] == [port]
            cmd = next(ln for ln in stage if ln.startswith("CMD "))
            assert "--port=8080" in cmd or "--port 8080" in cmd
