"""diffusers: ``ModelMixin`` models and whole ``DiffusionPipeline``s, loaded and saved tensorized.

:mod:`.models` holds the load and save paths of models and pipelines (a pipeline's transformers components go
through the transformers adapter); :mod:`.quantized` streams a model quantized on load a window at a time.
"""
