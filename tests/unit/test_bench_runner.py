"""The evaluation runner: per-sample logs, resume of a killed run without redoing finished
samples, retry of failed generations, stale logs, and the table / chart / scores files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from idlm.benchmarks.backends import Completion, Messages
from idlm.benchmarks.loading import BenchmarkDataError
from idlm.benchmarks.report import scores_table, write_reports
from idlm.benchmarks.runner import log_path, run_evaluation
from idlm.config.downstream import EvalOverride, EvalSampling, EvaluateSection

ITEMS = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks" / "tiny_eval_items.jsonl"
BENCH = "tiny_multiple_choice"  # 4 items in the fixture


def settings(**changes) -> EvaluateSection:
    base = dict(benchmarks=(BENCH,), batch_size=1,
                sampling=EvalSampling(temperature=1.0, max_new_tokens=32, seed=7),
                overrides={BENCH: EvalOverride(path=str(ITEMS))})
    return EvaluateSection(**{**base, **changes})


class SeededBackend:
    """Answers a letter drawn from each sample's seed: a resumed run must draw the same."""

    name = "seeded"
    identity = {"kind": "scripted"}

    def __init__(self, fail_ids: Sequence[str] = ()) -> None:
        self.prompts: list[str] = []
        self.fail_ids = set(fail_ids)
        self.thinking: list[bool | None] = []

    def generate(self, prompts: Sequence[Messages], sampling: EvalSampling,
                 seeds: Sequence[int] | None = None, thinking: bool | None = None
                 ) -> list[Completion]:
        self.thinking.append(thinking)
        out = []
        for messages, seed in zip(prompts, seeds, strict=True):
            prompt = messages[-1]["content"]
            self.prompts.append(prompt)
            if any(key in prompt for key in self.fail_ids):
                out.append(Completion("", "error", error="server went away"))
            else:
                out.append(Completion(f"<think>hmm</think>\nAnswer: {'ABCD'[seed % 4]}"))
        return out


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert "header" in json.loads(lines[0])
    return [json.loads(line) for line in lines[1:]]


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.unit.test_bench_runner import SeededBackend, settings
    from idlm.benchmarks.runner import run_evaluation

    class Slow(SeededBackend):
        def generate(self, prompts, sampling, seeds=None, thinking=None):
            time.sleep(0.4)
            return super().generate(prompts, sampling, seeds, thinking)

    run_evaluation({"seeded": Slow()}, settings(), Path(sys.argv[1]))
""")


def test_killed_evaluation_resumes_without_redoing_samples(tmp_path: Path) -> None:
    clean = run_evaluation({"seeded": SeededBackend()}, settings(), tmp_path / "clean")
    clean_log = records(log_path(tmp_path / "clean", "seeded", BENCH))

    out = tmp_path / "killed"
    log = log_path(out, "seeded", BENCH)
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    root = str(Path(__file__).resolve().parents[2])
    process = subprocess.Popen([sys.executable, str(script), str(out), "unused", root])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(records(log))
    assert 2 <= finished_before < 4
    with log.open("a") as handle:  # and a line torn by the kill
        handle.write('{"id": "eval-0000')

    resumer = SeededBackend()
    (result,) = run_evaluation({"seeded": resumer}, settings(), out)
    assert len(resumer.prompts) == 4 - finished_before
    assert (result.resumed, result.generated, result.samples) == (finished_before,
                                                                 4 - finished_before, 4)
    resumed_log = records(log)
    assert sorted(r["id"] for r in resumed_log) == sorted(r["id"] for r in clean_log)
    by_id = {r["id"]: r["output"] for r in clean_log}
    assert all(by_id[r["id"]] == r["output"] for r in resumed_log)
    assert result.correct == clean[0].correct


def test_failed_generations_are_retried_on_resume(tmp_path: Path) -> None:
    first_prompt = json.loads(ITEMS.read_text().splitlines()[0])["prompt"]
    flaky = SeededBackend(fail_ids=[first_prompt])
    (result,) = run_evaluation({"seeded": flaky}, settings(), tmp_path)
    assert result.errors == 1 and len(flaky.prompts) == 4
    healthy = SeededBackend()
    (result,) = run_evaluation({"seeded": healthy}, settings(), tmp_path)
    assert healthy.prompts == [first_prompt] and result.errors == 0


def test_a_log_from_other_settings_is_set_aside(tmp_path: Path) -> None:
    run_evaluation({"seeded": SeededBackend()}, settings(), tmp_path)
    again = SeededBackend()
    run_evaluation({"seeded": again}, settings(thinking=False), tmp_path)
    assert len(again.prompts) == 4 and set(again.thinking) == {False}
    assert log_path(tmp_path, "seeded", BENCH).with_suffix(".jsonl.stale").is_file()


def test_per_sample_log_fields(tmp_path: Path) -> None:
    run_evaluation({"seeded": SeededBackend()}, settings(), tmp_path)
    first = records(log_path(tmp_path, "seeded", BENCH))[0]
    assert first["messages"][0]["role"] == "user"
    assert first["output"].startswith("<think>hmm</think>")
    letter = first["extracted"]
    assert letter in "ABCD" and isinstance(first["correct"], bool)
    assert first["rule"] == "answer statement" and first["error"] is None
    assert first["detail"].startswith(f"answer statement: 'Answer: {letter}' -> {letter}; gold ")


class HalfUnreadable(SeededBackend):
    """Every other sample never closes its thinking (the budget ran out): no answer to read."""

    def generate(self, prompts: Sequence[Messages], sampling: EvalSampling,
                 seeds: Sequence[int] | None = None, thinking: bool | None = None
                 ) -> list[Completion]:
        done = super().generate(prompts, sampling, seeds, thinking)
        return [Completion("<think>A or maybe B") if seed % 2 else completion
                for completion, seed in zip(done, seeds, strict=True)]


def test_nothing_extracted_is_reported_per_benchmark_and_system(tmp_path: Path) -> None:
    results = run_evaluation({"ar": SeededBackend(), "isd": HalfUnreadable()}, settings(),
                             tmp_path)
    unreadable = [r for r in records(log_path(tmp_path, "isd", BENCH)) if r["rule"] is None]
    assert {r["output"] for r in unreadable} == {"<think>A or maybe B"}
    assert all(r["detail"].startswith("nothing extracted: unterminated thinking")
               for r in unreadable)
    ar, isd = results
    assert (ar.unextracted, isd.unextracted) == (0, len(unreadable))
    summary = json.loads(write_reports(results, tmp_path)["scores.json"].read_text())
    assert summary["unextracted"] == {
        "ar": {BENCH: 0.0}, "isd": {BENCH: round(100 * len(unreadable) / 4, 2)}}
    assert f"| tiny multiple choice | 0.0 | {100 * len(unreadable) / 4:.1f} |" in \
        scores_table(results)


def test_reports(tmp_path: Path) -> None:
    results = run_evaluation({"ar": SeededBackend(), "isd": SeededBackend()},
                             settings(), tmp_path)
    paths = write_reports(results, tmp_path)
    summary = json.loads(paths["scores.json"].read_text())
    assert set(summary["scores"]) == {"ar", "isd"}
    assert summary["scores"]["ar"][BENCH] == pytest.approx(results[0].score, abs=0.01)
    table = paths["scores.md"].read_text()
    assert table.splitlines()[0] == "| benchmark | n | ar | isd |"
    assert table.splitlines()[2].startswith("| tiny multiple choice | 4 | ")
    assert paths["scores.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scores_table(results) == table


def test_a_benchmark_with_no_samples_is_refused_before_any_generation(tmp_path: Path) -> None:
    # The items of another kind only: tiny_multiple_choice finds nothing to ask.
    others = tmp_path / "items.jsonl"
    others.write_text("".join(line + "\n" for line in ITEMS.read_text().splitlines()
                              if json.loads(line)["kind"] != "multiple_choice"))
    backend = SeededBackend()
    with pytest.raises(BenchmarkDataError) as refused:
        run_evaluation({"seeded": backend}, settings(overrides={
            BENCH: EvalOverride(path=str(others))}), tmp_path / "out")
    message = str(refused.value)
    assert message.startswith(f"{BENCH}: no samples in {others} of kind 'multiple_choice'")
    assert "\n" not in message and backend.prompts == []
    assert not (tmp_path / "out").exists()


def test_rows_without_what_the_scorer_reads_are_not_samples(tmp_path: Path) -> None:
    # A dataset's code row has no unit tests: tiny_code cannot score it, so it skips it.
    rows = [json.loads(line) for line in ITEMS.read_text().splitlines()]
    code = [row for row in rows if row["kind"] == "code"]
    untested = [{**row, "meta": {"row_index": 3}} for row in code]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in code[:1] + untested))
    from idlm.benchmarks.registry import get_benchmark

    assert [s.id for s in get_benchmark("tiny_code").load(str(path))] == [code[0]["id"]]
