"""Deployment files (integrations/k8s/*.yaml, integrations/Dockerfile) against the code they start.

Container commands are parsed with the real argparse parsers of ``hf-tensorizer`` and of the server, probe
paths are checked against the app's real routes, and every file the Dockerfile copies must exist.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K8S = ROOT / "integrations" / "k8s"

from hf_tensorizer.cli import build_parser as cli_parser  # noqa: E402
from integrations.server.__main__ import build_parser as server_parser  # noqa: E402


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _parse(parser: Any, argv: list[str]) -> Any:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of rejecting a command line
        raise AssertionError(f"command line rejected by {parser.prog}: {argv}") from exc


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    for e in container.get("env", []):
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.add(ref["name"])
    return refs


def test_every_document_is_well_formed() -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Secret", "Job", "InferenceService"}
    for d in docs:
        assert d.get("apiVersion") and d.get("kind"), d
        assert d["metadata"]["name"], d


def test_secret_holds_s3_credentials() -> None:
    secret = _one("Secret")
    assert secret["apiVersion"] == "v1"
    data = secret.get("stringData") or secret.get("data") or {}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)


def test_serialization_job_runs_the_real_cli() -> None:
    job = _one("Job")
    assert job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[0] == "hf-tensorizer"
    args = _parse(cli_parser(), command[1:])
    assert args.command == "serialize"
    assert args.hf_model_id and args.dest.startswith("s3://")
    assert _one("Secret")["metadata"]["name"] in _secret_refs(container)


def test_inference_service_runs_the_real_server() -> None:
    isvc = _one("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = isvc["spec"]["predictor"]["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:3] == ["python3", "-m", "integrations.server"]
    args = _parse(server_parser(), command[3:])
    job_args = _parse(cli_parser(), _one("Job")["spec"]["template"]["spec"]["containers"][0]["command"][1:])
    assert args.model_uri == job_args.dest, "the service must load what the Job writes"
    assert args.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    assert _one("Secret")["metadata"]["name"] in _secret_refs(container)
    # the probes hit routes the app really has, on the port the server listens on
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == f"/v1/models/{args.model_name}" and ready["port"] == args.port
    assert live["port"] == args.port
    assert live["path"] in _app_paths() and "/v1/models/{model}" in _app_paths()
    # one image for both: the Job's CLI and the server come from integrations/Dockerfile
    assert container["image"] == _one("Job")["spec"]["template"]["spec"]["containers"][0]["image"]
    if "cuda" in args.device:
        assert "nvidia.com/gpu" in container["resources"]["limits"]


def _app_paths() -> set[str]:
    pytest.importorskip("fastapi")
    from integrations.server import ModelRunner, ServerConfig, create_app

    app = create_app(ModelRunner(ServerConfig(model_uri="unused")))
    return {getattr(r, "path", "") for r in app.routes}


def test_dockerfile_copies_what_exists_and_runs_the_server() -> None:
    lines = [ln.strip() for ln in (ROOT / "integrations" / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0].startswith("FROM ")
    workdir = next(ln.split()[1] for ln in instructions if ln.startswith("WORKDIR "))
    for ln in instructions:
        if ln.startswith("COPY "):
            *sources, _dest = shlex.split(ln)[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert any(ln.startswith("RUN pip install") and ".[all]" in ln for ln in instructions)
    assert f"ENV PYTHONPATH={workdir}" in instructions  # python3 -m integrations.server resolves from any cwd
    cmd = next(ln for ln in instructions if ln.startswith("CMD "))
    assert "-m integrations.server" in cmd
    port = next(ln.split()[1] for ln in instructions if ln.startswith("EXPOSE "))
    assert f"--port={port}" in cmd
    isvc_args = _parse(server_parser(), _one("InferenceService")["spec"]["predictor"]["containers"][0]["command"][3:])
    assert isvc_args.port == int(port)
