"""The package version, importable from every layer (manifests record which version wrote an artifact)."""

__version__ = "0.1.0"
