"""Held-out accuracy broken down by question type, where the items name one."""

from idlm.benchmarks.base import Sample
from idlm.training.diagnostics import _by_question_type


def _sample(index: int, question_type: str | None) -> Sample:
    meta = {} if question_type is None else {"question_type": question_type}
    return Sample(f"eval-{index}", [{"role": "user", "content": "q"}], "A", meta)


def test_a_type_the_kind_score_hides_is_reported_on_its_own() -> None:
    samples = [_sample(0, "sum"), _sample(1, "largest"), _sample(2, "sum"),
               _sample(3, "largest"), _sample(4, "largest")]
    marks = [False, True, True, True, True]
    assert _by_question_type("multiple_choice", samples, marks) == {
        "accuracy_multiple_choice_largest": 1.0, "accuracy_multiple_choice_sum": 0.5}


def test_items_without_a_question_type_add_no_keys() -> None:
    assert _by_question_type("arithmetic", [_sample(0, None), _sample(1, None)],
                             [True, False]) == {}
