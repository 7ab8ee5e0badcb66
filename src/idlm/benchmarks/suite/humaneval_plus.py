"""HumanEval+ (evalplus): HumanEval's problems with ~80x more tests per problem.

Our 15th benchmark (the paper says 15 but its table names 14). The hub dataset has
HumanEval's schema, with the extra inputs built into each problem's ``check``.
"""

from __future__ import annotations

from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register
from idlm.benchmarks.suite.humaneval import HumanEval


@register
class HumanEvalPlus(HumanEval):
    name = "humaneval_plus"
    table_order = 15
    title = "HumanEval+"
    source = DataSource(hub_id="evalplus/humanevalplus", split="test",
                        revision="d32357cf319e50e9c8d8dab5ea876c72b0fd321b")
