"""The `export` stage: SGLang-servable bundles, their manifests, the registry."""
