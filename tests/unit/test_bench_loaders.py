"""Every loader on a local fixture in its benchmark's real schema, the registry, the pinned
hub sources, and the shipped HumanEval problems."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

import pytest

from idlm.benchmarks import (
    benchmark_names,
    get_benchmark,
    sandbox,
    suite_names,
)
from idlm.benchmarks.code_scoring import decode_lcb_tests
from idlm.benchmarks.loading import BenchmarkDataError, load_rows
from idlm.config.downstream import EvalSandbox

# What the registry finds by scanning suite/ (the tests assert its contents and order).
REAL_SUITE, TINY_SUITE = suite_names("real"), suite_names("tiny")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
FIXTURE = {"gpqa_diamond": "gpqa_diamond.csv", "gpqa_main": "gpqa_main.csv",
           "mathbench": "mathbench"}
# (benchmark, samples in its fixture, first sample id, first reference)
EXPECTED = [
    ("arc_challenge", 3, "Mercury_7175875", "C"),
    ("mmlu", 2, "abstract_algebra/0", "B"),
    ("mmlu_pro", 2, "70", "I"),
    ("gpqa_diamond", 2, "recIlfM0u0nKw6HIH", None),
    ("gpqa_main", 1, "recMainFixture01", None),
    ("gsm8k", 2, "gsm8k/0", "72"),
    ("math500", 2, "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("mathbench", 2, "arithmetic/cloze_en/0", "84"),
    ("aime24", 1, "aime24/60", "204"),
    ("aime25", 1, "aime25/0", "70"),
    ("humaneval", 2, "HumanEval/2", "    return number % 1.0\n"),
    ("mbpp", 1, "mbpp/11", None),
    ("livecodebench_v6", 2, "abc999_a", None),
    ("ifeval", 2, "ifeval/1000", None),
    ("humaneval_plus", 1, "HumanEval/2", None),
]


def fixture_path(name: str) -> str:
    return str(FIXTURES / FIXTURE.get(name, f"{name}.jsonl"))


def test_registry_has_the_fifteen_and_the_tiny_suite() -> None:
    assert len(REAL_SUITE) == 15 and len(set(REAL_SUITE)) == 15
    assert benchmark_names() == REAL_SUITE + TINY_SUITE
    assert [name for name, *_ in EXPECTED] == list(REAL_SUITE)
    for name in benchmark_names():
        bench = get_benchmark(name)
        assert bench.name == name and bench.category in ("multiple_choice", "math", "code",
                                                         "instruction")
    with pytest.raises(KeyError, match="unknown benchmark 'nope'"):
        get_benchmark("nope")


def test_a_benchmark_that_states_no_table_row_comes_after_the_papers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from idlm.benchmarks import registry
    from idlm.benchmarks.base import Benchmark

    class Unranked(Benchmark):   # a new benchmark file that omits table_order
        name, title, category = "unranked", "Unranked", "math"

    monkeypatch.setitem(registry._REGISTRY, "unranked", Unranked)
    assert suite_names("real") == (*REAL_SUITE, "unranked")


@pytest.mark.parametrize(("name", "count", "first_id", "reference"), EXPECTED)
def test_loader_reads_its_fixture(name: str, count: int, first_id: str,
                                  reference: str | None) -> None:
    samples = get_benchmark(name).load(fixture_path(name))
    assert len(samples) == count
    assert samples[0].id == first_id
    if reference is not None:
        assert samples[0].reference == reference
    assert len({s.id for s in samples}) == count
    for one in samples:
        assert one.messages[-1]["role"] == "user" and one.messages[-1]["content"].strip()
    assert len(get_benchmark(name).load(fixture_path(name), limit=1)) == 1


def test_prompts_follow_each_family() -> None:
    (math,) = get_benchmark("aime25").load(fixture_path("aime25"))
    assert math.messages[0]["content"].endswith(
        "Please reason step by step, and put your final answer within \\boxed{}.")
    (mc, _) = get_benchmark("mmlu_pro").load(fixture_path("mmlu_pro"))
    text = mc.messages[0]["content"]
    assert "'Answer: LETTER'" in text and "J) Unsafe practices, Joy, Fear, Serious" in text
    assert mc.meta["letters"] == "ABCDEFGHIJ"
    (lcb_stdin, lcb_leetcode) = get_benchmark("livecodebench_v6").load(
        fixture_path("livecodebench_v6"))
    assert lcb_stdin.messages[0]["role"] == "system"
    assert "Read the inputs from stdin" in lcb_stdin.messages[1]["content"]
    assert "def maxElement" in lcb_leetcode.messages[1]["content"]
    assert lcb_leetcode.meta["func_name"] == "maxElement"


def test_gpqa_shuffles_options_with_a_fixed_permutation() -> None:
    first = get_benchmark("gpqa_diamond").load(fixture_path("gpqa_diamond"))
    again = get_benchmark("gpqa_diamond").load(fixture_path("gpqa_diamond"))
    assert [s.meta["options"] for s in first] == [s.meta["options"] for s in again]
    for one in first:
        gold = one.meta["options"]["ABCD".index(one.reference)]
        assert gold in ("10^-4 eV", "13")
    assert {s.reference for s in first} != {"A"}  # the correct answer is not always first


def test_mathbench_keeps_english_subsets_only() -> None:
    samples = get_benchmark("mathbench").load(fixture_path("mathbench"))
    assert sorted(s.meta["format"] for s in samples) == ["cloze", "single_choice"]
    assert all("_cn" not in s.id for s in samples)


def test_tiny_benchmarks_split_prepare_items_by_kind() -> None:
    path = str(FIXTURES / "tiny_eval_items.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    counts = {name: len(get_benchmark(name).load(path)) for name in TINY_SUITE[:4]}
    assert counts == {f"tiny_{kind}": sum(r["kind"] == kind for r in rows)
                      for kind in ("arithmetic", "multiple_choice", "code", "instruction")}
    assert sum(counts.values()) == len(rows) == 16
    one = get_benchmark("tiny_arithmetic").load(path)[0]
    assert one.messages == rows[[r["kind"] for r in rows].index("arithmetic")]["messages"]
    with pytest.raises(BenchmarkDataError, match="eval_items.jsonl"):
        get_benchmark("tiny_code").load()


def test_humaneval_ships_with_the_package() -> None:
    problems = get_benchmark("humaneval").load()
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    tiny = get_benchmark("tiny_humaneval").load()
    assert [s.id for s in tiny] == [f"HumanEval/{i}" for i in range(20)]


def test_hub_sources_pass_their_pinned_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(hub_id, config, split, revision):
        calls.append((hub_id, config, split, revision))
        return [{"question": "q", "answer": "#### 3"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (one,) = get_benchmark("gsm8k").load()
    assert one.reference == "3"
    assert calls == [("openai/gsm8k", "main", "test", "740312add88f781978c0658806c59bc2815b9866")]
    get_benchmark("gsm8k").load(revision="abc123")
    assert calls[-1][-1] == "abc123"


def test_hub_files_are_checked_against_their_sha256(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    import huggingface_hub

    changed = tmp_path / "test.jsonl"
    changed.write_text(Path(fixture_path("livecodebench_v6")).read_text())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(changed))
    with pytest.raises(BenchmarkDataError, match="sha256 differs"):
        get_benchmark("livecodebench_v6").load()


def test_missing_local_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match="no such file"):
        load_rows(get_benchmark("mmlu").source, tmp_path / "missing.jsonl")


def test_lcb_private_tests_decode_without_running_pickled_code() -> None:
    cases = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert decode_lcb_tests(packed) == cases
    assert decode_lcb_tests(json.dumps(cases)) == cases

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    hostile = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        decode_lcb_tests(hostile)


@pytest.mark.parametrize("name", ["humaneval", "mbpp", "gsm8k", "math500", "arc_challenge"])
def test_fixture_gold_answers_score_correct(name: str) -> None:
    bench = get_benchmark(name, EvalSandbox(
        allow_unsandboxed=not sandbox.isolation_available()))
    for one in bench.load(fixture_path(name)):
        if bench.category == "code":
            gold = f"```python\n{one.meta.get('prompt', '')}{one.reference}\n```"
        elif bench.category == "math":
            gold = f"<think>work</think>\nThe answer is $\\boxed{{{one.reference}}}$."
        else:
            gold = f"Answer: {one.reference}"
        assert bench.score(gold, one).correct, (name, one.id)
