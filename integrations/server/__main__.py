"""``python -m integrations.server --model-uri URI [--precision ...] [--port ...] ...`` — see :func:`build_parser`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .config import DEFAULT_LOAD_TIMEOUT_S, LOADERS, PRECISION_NAMES, ServerConfig, parse_option
from .snapshot import Snapshot, prefetch, reason_not_to, take_lease


def build_parser() -> argparse.ArgumentParser:
    """The server's command line (also read by the manifest tests, so manifests cannot drift from it)."""
    p = argparse.ArgumentParser(
        prog="python -m integrations.server",
        description="KServe predictor (kserve SDK: V1 and V2 REST, health, Prometheus metrics): text generation "
        "(transformers causal LMs) and text-to-image (diffusers pipelines), weights streamed through hf_tensorizer.",
    )
    p.add_argument("--model-uri", required=True,
                   help="tensorized artifact: local folder, file://, http(s)://, s3://bucket/prefix or hf://org/repo; "
                        "with --loader hf: a safetensors model folder or a Hub repo id")  # fmt: skip
    p.add_argument("--precision", choices=sorted(PRECISION_NAMES), default="float32", help="weights dtype")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--model-name", default="model", help="the <name> in /v1/models/<name>")
    p.add_argument("--loader", choices=LOADERS, default="hf_tensorizer",
                   help="hf_tensorizer (default) or hf: stock from_pretrained, for comparisons")  # fmt: skip
    p.add_argument("--key-file", help="decryption key file for encrypted artifacts (or set HF_TENSORIZER_KEY)")
    p.add_argument("--tensorizer-option", action="append", default=[], metavar="KEY=VALUE", type=parse_option,
                   help="extra tensorizer_options, JSON values (num_readers=8, verify_hash=true, "
                        "endpoint_url=http://...); repeat")  # fmt: skip
    p.add_argument("--max-new-tokens-limit", type=int, default=512)
    p.add_argument("--max-input-tokens", type=int, default=0, metavar="N",
                   help="longest prompt accepted, in tokens (default and upper bound: the model's maximum "
                        "positions); longer ones get a 400 without reaching the model")  # fmt: skip
    p.add_argument("--max-request-tokens", type=int, default=4096, metavar="N",
                   help="most new tokens one request may ask for, summed over its instances")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests admitted at once (running + queued + held during the load); more get 503 "
                        "before their body is read, and readiness says 503 while full")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="BYTES",
                   help="larger request bodies get 413 without being read")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop a request still running after this long (504); 0: no limit")  # fmt: skip
    p.add_argument("--ready-wait", type=float, default=0.0, metavar="SECONDS",
                   help="hold predict requests arriving during the load up to SECONDS instead of a 503")  # fmt: skip
    p.add_argument("--load-timeout", type=float, default=DEFAULT_LOAD_TIMEOUT_S, metavar="SECONDS",
                   help="exit with status 1 (LoadTimeoutError) when the weights are not in after SECONDS, rather "
                        "than stay unready; 0: wait forever")  # fmt: skip
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="read a local artifact's weights with pread, instead of mapping them under a read lease or "
                        "from a sealed in-memory snapshot (docs/serving.md)")  # fmt: skip
    p.add_argument("--no-lease", dest="lease", action="store_false",
                   help="copy a local artifact's weights into a sealed in-memory snapshot during start-up and map "
                        "that, instead of mapping the file under a read lease (docs/serving.md)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until it is stopped. Returns 0 after a clean stop, 1 when the model failed to load."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(args.tensorizer_option)
    snapshot = lease = None
    no_lease = None if args.lease else "--no-lease"
    if args.snapshot and not reason_not_to(args.model_uri, loader=args.loader, device=args.device,
                                           key_file=args.key_file, tensorizer_options=options):  # fmt: skip
        # the disk works while torch, transformers and kserve import
        if args.lease:
            lease, no_lease = take_lease(args.model_uri)
        if lease is not None:
            prefetch(lease.path)
        else:
            snapshot = Snapshot(args.model_uri).start()
    from hf_tensorizer.sources import redact

    from .app import build, serve, set_log_level

    config = ServerConfig(model_uri=args.model_uri, model_name=args.model_name, precision=args.precision,
                          device=args.device, loader=args.loader, key_file=args.key_file,
                          tensorizer_options=options, load_timeout_s=args.load_timeout, snapshot=args.snapshot,
                          lease=args.lease,
                          max_new_tokens_limit=args.max_new_tokens_limit, ready_wait_s=args.ready_wait,
                          max_input_tokens=args.max_input_tokens, max_request_tokens=args.max_request_tokens,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          request_timeout_s=args.request_timeout)  # fmt: skip
    server, model = build(config, host=args.host, port=args.port, snapshot=snapshot, lease=lease, no_lease=no_lease)
    set_log_level(args.log_level)
    failure, hung = serve(server, model)
    if failure:
        print(f"error: could not load {redact(args.model_uri)}: {failure}", file=sys.stderr)
        if hung:  # the load's threads are still blocked (in a read that never returns): do not wait for them
            logging.shutdown()
            sys.stderr.flush()
            os._exit(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
