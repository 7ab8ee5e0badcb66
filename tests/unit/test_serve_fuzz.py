"""``idlm serve`` against a fuzzer nobody here wrote (issue 15, item 3).

schemathesis reads the server's own /openapi.json and runs all its phases (examples,
coverage, fuzzing with valid and invalid data, stateful) with every check: no 5xx, every
status and body as documented, schema-valid requests accepted, schema-violating ones
refused, 405s with an ``Allow`` header. The server runs once for the module, in process,
on a tiny random model whose context (8192) no generated prompt fills: the context limit
on *text* cannot be written in JSON Schema and is stated in the schema's description.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_serve import build_model_dir, running_server

# Bounded: about 700 requests in ~20 s on 2 CPU cores (100 gives ~1,500, also clean).
MAX_EXAMPLES = 40
SEED = 1


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> str:
    from idlm.decoding.loading import load_engine

    model_dir = build_model_dir(tmp_path_factory.mktemp("fuzz") / "model", context=8192)
    engine = load_engine(model_dir, mode="isd", max_batch_size=8)
    with running_server(engine, max_new_tokens=16, max_waiting=32) as url:
        yield url


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(server_url,
                                                                        tmp_path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    completed = subprocess.run(
        [st, "run", f"{server_url}/openapi.json", "--checks", "all",
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--request-timeout", "60",
         "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    report = completed.stdout + completed.stderr
    generated = re.search(r"(\d+) generated, (\d+) passed", report)
    assert completed.returncode == 0 and generated, report[-6000:]
    assert int(generated.group(1)) == int(generated.group(2)) > 300
    print(f"schemathesis: {generated.group(0)}")


def test_undeclared_methods_answer_405_with_allow(server_url) -> None:
    import httpx

    answer = httpx.request("TRACE", f"{server_url}/v1/models")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET"
    assert answer.json()["error"]["message"] == "Method Not Allowed"


def test_the_schema_states_the_engines_limits(server_url) -> None:
    import httpx

    schema = httpx.get(f"{server_url}/openapi.json").json()
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    text, ids = prompt["anyOf"][0], prompt["anyOf"][1]
    assert text == {"type": "string", "minLength": 1}
    assert ids["maxItems"] == 8191 and ids["minItems"] == 1
    assert ids["items"]["minimum"] == 0 and "const" in ids["items"]["not"]   # not MASK
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert sorted(responses) == ["200", "400", "404", "429"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
