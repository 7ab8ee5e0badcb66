"""Pure decoding logic on hand-built tensors: verification, sampling, layout, stats, cache."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding import bookkeeping as book
from idlm.decoding.acceptance import leading_accepts, verify_greedy, verify_sampled
from idlm.decoding.kv_cache import RaggedKVCache
from idlm.decoding.sampling import counter_uniforms, sample_from, warp_probs
from idlm.decoding.stats import StatsTensors, aggregate, expected_tokens_per_forward

V = 6


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()[None] * 5


def test_leading_accepts_stops_at_first_failure_and_at_num_checked() -> None:
    accept = torch.tensor([[True, True, True], [True, False, True], [False, True, True],
                           [True, True, True]])
    assert leading_accepts(accept, torch.tensor([3, 3, 3, 1])).tolist() == [3, 1, 0, 1]


@pytest.mark.parametrize(("drafts", "accepted", "token"), [
    ([1, 2, 3], 3, 4),   # all accepted: bonus from p_3
    ([1, 5, 3], 1, 2),   # reject at k=1: replacement argmax p_1
    ([0, 2, 3], 0, 1),   # reject at the first draft
])
def test_greedy_verification(drafts: list[int], accepted: int, token: int) -> None:
    anchor = one_hot_logits([1, 2, 3, 4])          # p_i argmax: 1, 2, 3, 4
    masks = one_hot_logits([5, 0, 1])
    outcome = verify_greedy(anchor, masks, torch.tensor([drafts]), torch.tensor([3]))
    assert outcome.accepted.tolist() == [accepted] and outcome.token.tolist() == [token]
    assert outcome.all_accepted.tolist() == [accepted == 3]
    assert outcome.next_drafts.tolist() == [[5, 0, 1]]
    emitted, count = book.emitted_tokens(torch.tensor([drafts]), outcome.accepted,
                                         outcome.token)
    assert emitted[0, :int(count)].tolist() == drafts[:accepted] + [token]


def test_greedy_cold_start_checks_nothing() -> None:
    outcome = verify_greedy(one_hot_logits([1, 2, 3]), one_hot_logits([4, 5]),
                            torch.tensor([[0, 0]]), torch.tensor([0]))
    assert outcome.accepted.tolist() == [0] and outcome.token.tolist() == [1]
    assert outcome.all_accepted.tolist() == [True]


def sampled(p_rows: list[list[float]], q_rows: list[list[float]], drafts: list[int],
            accept_u: list[float], token_u: float):
    anchor = torch.tensor([p_rows])
    q = torch.tensor([q_rows])
    return verify_sampled(anchor, q, torch.tensor([drafts]), q, torch.tensor([len(drafts)]),
                          torch.tensor([accept_u], dtype=torch.float64),
                          torch.tensor([token_u], dtype=torch.float64),
                          torch.tensor([[0.0] * len(drafts)], dtype=torch.float64),
                          torch.tensor([False]))


def test_sampled_acceptance_is_u_below_p_over_q_and_residual_on_reject() -> None:
    p0 = [0.5, 0.5, 0.0, 0.0]
    p1 = [0.0, 0.0, 1.0, 0.0]
    q0 = [1.0, 0.0, 0.0, 0.0]     # draft 0 from q0: accept iff u < p/q = 0.5
    accept = sampled([p0, p1], [q0], [0], [0.49], 0.0)
    assert accept.accepted.tolist() == [1] and accept.token.tolist() == [2]   # bonus ~ p1
    reject = sampled([p0, p1], [q0], [0], [0.51], 0.0)
    # residual norm(max(0, p0 - q0)) = one-hot(1): the replacement must be token 1
    assert reject.accepted.tolist() == [0] and reject.token.tolist() == [1]
    assert reject.all_accepted.tolist() == [False]


def argmax_step(p_rows: list[list[float]], drafts: list[int], stale_q: list[list[float]],
                accept_u: torch.Tensor, token_u: torch.Tensor):
    """Many rows of one verify step with argmax proposals; ``stale_q`` must not be read."""
    rows = accept_u.shape[0]
    anchor = torch.tensor([p_rows]).expand(rows, -1, -1)
    q = torch.tensor([stale_q]).expand(rows, -1, -1)
    return verify_sampled(anchor, q, torch.tensor([drafts]).expand(rows, -1), q,
                          torch.full((rows,), len(drafts)), accept_u, token_u,
                          torch.zeros(rows, len(drafts), dtype=torch.float64),
                          torch.ones(rows, dtype=torch.bool))


def test_argmax_proposal_accepts_with_p_and_redraws_from_p_without_the_draft() -> None:
    p0, p1 = [0.3, 0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]
    q0 = [0.05, 0.9, 0.05, 0.0]   # the draft's own q: u < p/q would accept u < 0.556
    uniforms = torch.tensor([[0.49], [0.51], [0.51]], dtype=torch.float64)
    outcome = argmax_step([p0, p1], [1], [q0], uniforms,
                          torch.tensor([0.0, 0.0, 0.99], dtype=torch.float64))
    assert outcome.accepted.tolist() == [1, 0, 0]            # accept iff u < p(s) = 0.5
    # On rejection the law is p without s: {0: 0.6, 2: 0.4}, never the draft again.
    assert outcome.token.tolist() == [3, 0, 2]


def test_argmax_proposal_step_emits_the_target_law() -> None:
    """Two drafts, 200k rows: x1 ~ p0; x2 ~ p1 given x1 = s1; x3 ~ p2 given both accepted."""
    generator = torch.Generator().manual_seed(0)
    p_rows = [[0.1, 0.45, 0.3, 0.15], [0.2, 0.1, 0.6, 0.1], [0.25, 0.25, 0.25, 0.25]]
    drafts, rows = [2, 2], 200_000
    outcome = argmax_step(p_rows, drafts, [[0.1, 0.1, 0.7, 0.1]] * 2,
                          torch.rand(rows, 2, generator=generator, dtype=torch.float64),
                          torch.rand(rows, generator=generator, dtype=torch.float64))
    emitted, _ = book.emitted_tokens(torch.tensor([drafts]).expand(rows, -1),
                                     outcome.accepted, outcome.token)
    given = torch.ones(rows, dtype=torch.bool)
    for position, law in enumerate(p_rows):
        picked = emitted[given, position]
        frequency = torch.bincount(picked, minlength=4).double() / picked.numel()
        sigma = (torch.tensor(law) * (1 - torch.tensor(law)) / picked.numel()).sqrt()
        assert ((frequency - torch.tensor(law, dtype=torch.float64)).abs()
                <= 5 * sigma + 1e-12).all(), position
        if position < len(drafts):
            given &= emitted[:, position] == drafts[position]


def test_sampled_path_on_one_hot_rows_is_greedy() -> None:
    anchor = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3]]), V).float()
    masks = torch.nn.functional.one_hot(torch.tensor([[4, 5]]), V).float()
    drafts = torch.tensor([[1, 0]])
    outcome = verify_sampled(anchor, masks, drafts, torch.nn.functional.one_hot(drafts, V).float(),
                             torch.tensor([2]), torch.rand(1, 2, dtype=torch.float64),
                             torch.rand(1, dtype=torch.float64),
                             torch.rand(1, 2, dtype=torch.float64), torch.tensor([False]))
    greedy = verify_greedy(anchor, masks, drafts, torch.tensor([2]))
    for name in ("accepted", "token", "all_accepted", "next_drafts"):
        assert torch.equal(getattr(outcome, name), getattr(greedy, name)), name


def test_counter_uniforms_are_a_pure_function_of_seed_step_slot() -> None:
    seeds, steps = torch.tensor([0, 1, 0, 2**40]), torch.tensor([0, 0, 1, 0])
    slots = torch.tensor([0, 1, 1024])
    first = counter_uniforms(seeds, steps, slots)
    assert torch.equal(first, counter_uniforms(seeds, steps, slots))
    alone = counter_uniforms(seeds[2:3], steps[2:3], slots)
    assert torch.equal(first[2:3], alone)                      # independent of batch-mates
    assert len(set(first.flatten().tolist())) == first.numel()
    many = counter_uniforms(torch.arange(20000), torch.zeros(20000, dtype=torch.long),
                            torch.tensor([0]))
    assert 0 <= float(many.min()) and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.01
    histogram = torch.histc(many.float(), bins=10, min=0, max=1)
    assert float(histogram.min()) > 1800 and float(histogram.max()) < 2200


def test_inverse_cdf_never_picks_zero_mass() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]]).expand(5, 4)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9, 0.999999], dtype=torch.float64)
    assert sample_from(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_warp_top_k_top_p_temperature_and_greedy_rows() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(4, 1, 4)
    probs = warp_probs(logits, torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([2, 0, 0, 0]),
                       torch.tensor([1.0, 0.7, 1.0, 1.0]))[:, 0]
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(probs[1], torch.tensor([0.625, 0.375, 0, 0]))  # 0.5 < 0.7
    torch.testing.assert_close(probs[2], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert probs[3].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_step_window_layouts() -> None:
    window = book.step_window(
        pending=torch.tensor([10, 20, 30, 40]), drafts=torch.tensor([[1, 2, 3], [4, 5, 6],
                                                                     [7, 8, 9], [0, 0, 0]]),
        has_drafts=torch.tensor([True, False, True, False]), num_drafts=torch.tensor([3, 3, 1, 0]),
        lengths=torch.tensor([5, 6, 7, 8]), mask_token_id=99, pad_token_id=0)
    assert window.input_ids.tolist() == [[10, 1, 2, 3, 99, 99, 99],     # verify, N=4
                                         [20, 99, 99, 99, 0, 0, 0],     # cold start
                                         [30, 7, 99, 0, 0, 0, 0],       # verify, N=2
                                         [40, 0, 0, 0, 0, 0, 0]]        # AR
    assert window.position_ids[1].tolist() == list(range(6, 13))
    assert window.num_checked.tolist() == [3, 0, 1, 0]
    rows = book.logit_rows(window.anchor, window.num_checked, 3, 7)
    assert rows[0].tolist() == [0, 1, 2, 3, 4, 5, 6] and rows[1].tolist()[4:] == [1, 2, 3]


def test_prefill_window_and_mask() -> None:
    window = book.prefill_window([[5, 6, 7], [8]], [2, 2], 2, 99, 0, "cpu")
    assert window.input_ids.tolist() == [[5, 6, 7, 99, 99], [8, 99, 99, 0, 0]]
    assert window.anchor.tolist() == [2, 0]
    mask = book.attention_mask(torch.tensor([3, 1]), 2, 5)[:, 0]
    assert mask[0].tolist() == [[True] * 4 + [False], [True] * 5]
    assert mask[1].tolist() == [[True, True, False, False, False],
                                [True, True, True, False, False]]


def test_commit_keeps_up_to_the_stop_token_and_the_budget() -> None:
    emitted = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    buffer = torch.zeros(4, 6 + 4, dtype=torch.long)
    written = torch.tensor([0, 1, 4, 2])
    budget = written + torch.tensor([10, 10, 2, 10])
    stopped = torch.zeros(4, dtype=torch.bool)
    finished = torch.tensor([False, False, False, True])
    book.commit_tokens(buffer, written, budget, torch.tensor([[3, -1], [7, -1], [3, -1],
                                                              [9, -1]]),
                       emitted, torch.tensor([4, 2, 4, 4]), ~finished, stopped, finished)
    # Row 0 stops at its stop token (kept); row 1 has 2 tokens and its stop id 7 lies past
    # them; row 2 runs out of budget; row 3 had finished and takes nothing.
    assert written.tolist() == [3, 3, 6, 2]
    assert [buffer[row, :int(end)].tolist() for row, end in enumerate(written)] == [
        [1, 2, 3], [0, 5, 6], [0, 0, 0, 0, 1, 2], [0, 0]]
    assert stopped.tolist() == [True, False, False, False]
    assert finished.tolist() == [True, False, True, True]


def test_stats_record_and_formula() -> None:
    stats = StatsTensors.zeros(4, 3, "cpu")
    stats.record(active=torch.tensor([True, True, False, True]),
                 num_checked=torch.tensor([3, 0, 3, 3]), accepted=torch.tensor([1, 0, 3, 3]),
                 all_accepted=torch.tensor([False, True, True, True]))
    stats.record_unverified(torch.tensor([False, False, True, False]))
    # (forwards, rounds V/R/C, tried, accepted) per row
    assert stats.summary(0, 3) == (1, [0, 1, 0], [1, 1, 0], [1, 0, 0])
    assert stats.summary(1, 3) == (1, [0, 0, 1], [0, 0, 0], [0, 0, 0])
    assert stats.summary(2, 0) == (1, [0, 0, 0], [], [])     # an AR row: forwards only
    assert stats.summary(3, 3) == (1, [1, 0, 0], [1, 1, 1], [1, 1, 1])
    assert expected_tokens_per_forward(0.9, 4) == pytest.approx(2.919, abs=1e-3)
    assert expected_tokens_per_forward(1.0, 4) == pytest.approx(4.0)
    assert aggregate([])["tokens_per_forward"] == 0.0


def test_cache_writes_at_row_offsets_and_compacts() -> None:
    cache = RaggedKVCache(1, 2, 1, 1, 4, torch.float32, "cpu")
    cache.begin_forward(torch.tensor([0, 2]), 2, 4)
    keys, _ = cache.update(torch.tensor([[[[1.0], [2.0]]], [[[3.0], [4.0]]]]),
                           torch.zeros(2, 1, 2, 1), 0)
    assert keys[:, 0, :, 0].tolist() == [[1, 2, 0, 0], [0, 0, 3, 4]]
    cache.reserve(200)
    assert cache.capacity >= 200 and cache.keys[0][1, 0, 2:4, 0].tolist() == [3, 4]
    cache.select_rows(torch.tensor([1]))
    assert cache.rows == 1 and cache.keys[0][0, 0, 2, 0] == 3


def test_all_cold_start_window_is_n_wide() -> None:
    window = book.step_window(torch.tensor([10, 20]), torch.tensor([[1, 2, 3], [4, 5, 6]]),
                              torch.tensor([False, False]), torch.tensor([3, 2]),
                              torch.tensor([4, 9]), 99, 0, max_checked=0)
    assert window.input_ids.tolist() == [[10, 99, 99, 99], [20, 99, 99, 0]]
    assert window.drafting.tolist() == [[False, True, True, True], [False, True, True, False]]
    rows = book.logit_rows(window.anchor, window.num_checked, 3, 4)
    assert rows.tolist()[0] == [0, 1, 2, 3, 1, 2, 3]


def test_cache_concat_matches_capacities_that_reserve_would_round_differently() -> None:
    # 128 vs 192 slots: reserve(192) on the smaller would double it to 256; concat must
    # bring both to exactly 192 and keep every stored entry where it was.
    small = RaggedKVCache(1, 2, 1, 2, 128, torch.float32, "cpu")
    large = RaggedKVCache(1, 3, 1, 2, 192, torch.float32, "cpu")
    small.keys[0][:, :, 5] = 1.0
    large.values[0][:, :, 150] = 2.0
    small.concat(large)
    assert small.rows == 5 and small.capacity == 192
    assert small.keys[0][:2, :, 5].eq(1).all() and small.values[0][2:, :, 150].eq(2).all()


@pytest.mark.parametrize("verifying", [True, False])
def test_uniform_layout_is_the_general_layout(verifying: bool) -> None:
    pending, lengths = torch.tensor([10, 20]), torch.tensor([4, 9])
    drafts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    general = book.step_window(pending, drafts, torch.tensor([verifying] * 2),
                               torch.tensor([3, 3]), lengths, 99, 0,
                               max_checked=3 if verifying else 0)
    layout = book.UniformLayout.build(2, 3, 3 if verifying else 0, 99, "cpu")
    uniform = layout.window(pending, drafts, lengths)
    for name in ("input_ids", "position_ids", "anchor", "num_checked", "drafting"):
        assert torch.equal(getattr(uniform, name), getattr(general, name)), name
    rows = book.logit_rows(general.anchor, general.num_checked, 3, general.input_ids.shape[1])
    if uniform.logit_rows is book.ALL_ROWS:
        assert rows.tolist() == [list(range(7))] * 2
    else:
        assert rows.tolist() == [uniform.logit_rows.tolist()] * 2
