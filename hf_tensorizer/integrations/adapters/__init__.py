"""One adapter per library: the code that knows a library's classes and replaces only its weight loading/saving.

- :mod:`.transformers` — ``PreTrainedModel`` loads (``load``; also quantized checkpoints and tensor-parallel
  shards) and tensorized saves (``save``);
- :mod:`.diffusers` — diffusers models and whole pipelines (``models``) and quantize-on-load (``quantized``);
- :mod:`.peft` — adapters from any URI (``load``) and tensorized adapter saves (``save``);
- :mod:`.vllm` — vLLM's ``--load-format hf_tensorizer`` (a ``vllm.general_plugins`` entry point): the front end
  resolves a remote artifact's small files, the loader streams the weights, each tensor-parallel rank reading only
  the boxes vLLM's weight loaders narrow to.

An adapter imports the artifact rules (:mod:`..artifact`), the shared loading helpers (:mod:`..loading`) and the
base helpers (``options``, ``patches``, ``parallel``), never another adapter — except diffusers, whose pipelines
hold transformers models. ``tests/test_architecture.py`` checks this.
"""
