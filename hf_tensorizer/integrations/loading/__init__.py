"""What every library adapter shares when it loads: the weights of one load, and offloaded ``"disk"`` entries.

- :mod:`.weights` — the weight files of a load (``model.tensors`` or safetensors shards, local or remote), opened
  once and streamed onto the devices each tensor belongs on;
- :mod:`.offload` — ``device_map`` entries ``"disk"`` read from the artifact itself, never copied.
"""
