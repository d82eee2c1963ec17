"""transformers: ``from_pretrained`` of artifacts and checkpoint URIs (:mod:`.load`), tensorized saves (:mod:`.save`).

A load starts in :func:`.load.load_pretrained` (called by ``hf_tensorizer.from_pretrained`` and, with the switch on,
by the patched ``PreTrainedModel.from_pretrained``). :mod:`.quantized` handles pre-quantized checkpoints and what
a quantizer is handed; :mod:`.tensor_parallel` lets each rank read only the bytes of its own shards.
"""
