"""The artifact's rules: what a tensorized artifact holds, where, at which version, and how it is written.

An artifact is a folder (or a remote prefix) with ``config.json`` & co., the weights and a manifest written last.
Nothing here knows a library's model classes; the adapters build on it.

- :mod:`.layout` — the names inside an artifact or a stock model folder (weights, variants, small files);
- :mod:`.manifest` — ``hf_tensorizer.json``: what an artifact holds, checked so a hostile one is harmless;
- :mod:`.versions` — every file of a load opened at the version its manifest recorded;
- :mod:`.routing`, :mod:`.hub_ids` — which ``from_pretrained`` arguments are artifacts (URIs, local folders, bare
  Hub ids of tensorized repositories);
- :mod:`.cache`, :mod:`.probe` — a remote artifact's small files fetched into a local folder (what a manifest
  lists, or what probing finds);
- :mod:`.publish`, :mod:`.extra_files` — writing an artifact (staged, small files uploaded, manifest last) and
  carrying the source folder's other files into it.
"""
