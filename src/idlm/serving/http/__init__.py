"""`idlm serve`: the OpenAI-compatible HTTP server over the engine (FastAPI app,
engine worker thread, wire protocol, metrics)."""
