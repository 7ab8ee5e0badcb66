"""SGLang-servable bundles, their manifests, the registry; the stage that writes them is
`idlm.stages.export`."""
