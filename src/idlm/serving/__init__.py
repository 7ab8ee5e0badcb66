"""Serving: the OpenAI-compatible server (idlm serve), SGLang export and the load gate."""
