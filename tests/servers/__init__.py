"""Real servers for the remote-transport tests, loopback only (127.0.0.1).

* :mod:`.http_range` — an HTTP/1.1 range server with fault modes (drop, 5xx/429, stall, object change, ignored
  Range, redirects, signed redirect expiry, bearer token, HTTPS), run in a subprocess.
* :mod:`.hub` — a local Hugging Face Hub (resolve/ with Range, ETag and commit headers, a CDN on another origin,
  repo info, tree, create, preupload and commit) in threads; how to point huggingface_hub at it is in its docstring.
* :mod:`.fault_proxy` — a TCP proxy that cuts or stalls responses, for servers without fault modes (moto).

``tests/conftest.py`` puts ``tests/`` on ``sys.path`` and wraps these in the ``http_server``, ``hub_server`` and
``moto_s3`` fixtures.
"""
