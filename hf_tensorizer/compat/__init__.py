"""Drop-in surfaces of other libraries' readers, on hf_tensorizer's engine (docs/compat.md).

- :mod:`.safetensors` — ``safe_open`` / ``load_file`` / ``load``, safetensors' reader API: point code that
  imports them from ``safetensors`` here and the bytes come through our engine.
- :mod:`.tensorizer` — CoreWeave tensorizer's public API (``TensorSerializer``, ``TensorDeserializer``,
  ``EncryptionParams``, ``stream_io``, ``utils``, ``torch_compat``...): migrating is one import line.

Nothing is imported eagerly: each submodule pulls in only what it needs.
"""
