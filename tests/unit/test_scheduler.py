"""The scheduling policy, rule by rule, without a model (in the style of vLLM's
tests/v1/core/test_scheduler.py): token budget, chunked prefill, admission order, preemption order
and recompute, no re-admission in the step that preempted, KV blocks freed exactly once."""

from __future__ import annotations

from model.sampling import SamplingParams
from router.kv_cache import BlockManager
from router.scheduler import Scheduler, Sequence, Status


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16, budget: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def make_request(sched: Scheduler, name: str, prompt_len: int) -> Sequence:
    seq = Sequence(
        name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=64, temperature=0), sched.blocks.block_size
    )
    sched.add(seq)
    return seq


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> dict[str, int]:
    """One step as the engine runs it: schedule, then every sequence that completed its known tokens
    gets one new token. Returns {request: tokens computed this step}."""
    out = sched.schedule()
    for s in out:
        s.seq.num_computed += s.num_new
        if s.seq.num_computed == s.seq.num_tokens:
            s.seq.output_ids.append((tokens or {}).get(s.seq.req_id, 7))
    return {s.seq.req_id: s.num_new for s in out}


def finish(sched: Scheduler, seq: Sequence) -> None:
    sched.remove(seq)
    seq.status = Status.FINISHED


def test_token_budget_is_never_exceeded():
    sched = make_scheduler(budget=10)
    for i in range(5):
        make_request(sched, f"r{i}", 4)
    got = step(sched)
    assert sum(got.values()) <= 10
    assert got == {"r0": 4, "r1": 4, "r2": 2}  # r2's prompt is chunked to fill the budget


def test_chunked_prefill_spreads_a_long_prompt_and_shares_steps_with_decodes():
    sched = make_scheduler(budget=8)
    short = make_request(sched, "short", 3)
    step(sched)  # short: prefill of 3
    make_request(sched, "long", 20)
    got = step(sched)
    assert got == {"short": 1, "long": 7}  # the decode first, the prompt's chunk fills the rest
    got = step(sched)
    assert got == {"short": 1, "long": 7}
    got = step(sched)
    assert got == {"short": 1, "long": 6}  # the last chunk: the prompt is complete, it samples
    assert sched.running == [short, sched.running[1]] and len(sched.running[1].output_ids) == 1


def test_admission_is_in_arrival_order_and_respects_the_sequence_limit():
    sched = make_scheduler(max_num_seqs=2)
    for name in ["a", "b", "c"]:
        make_request(sched, name, 2)
    assert list(step(sched)) == ["a", "b"]
    assert [s.req_id for s in sched.waiting] == ["c"]
    finish(sched, sched.running[0])
    assert list(step(sched)) == ["b", "c"]


def test_admission_waits_for_blocks():
    sched = make_scheduler(num_blocks=3, block_size=4)
    make_request(sched, "big", 8)  # 2 blocks
    make_request(sched, "next", 8)  # would need 2 more, only 1 is free
    assert list(step(sched)) == ["big"]
    assert [s.req_id for s in sched.waiting] == ["next"]


def test_preemption_takes_the_most_recent_and_recomputes_it():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a = make_request(sched, "a", 4)
    b = make_request(sched, "b", 4)
    c = make_request(sched, "c", 4)
    step(sched)  # 3 blocks used, all prompts fit their block; each sampled a token
    step(sched)  # a grows into the 4th block; b and c need blocks too: c (newest) is preempted
    assert c.status is Status.WAITING and c.num_computed == 0 and not c.table.blocks
    assert sched.waiting[0] is c and sched.num_preemptions >= 1
    assert a.status is Status.RUNNING  # the oldest keeps running
    # recompute: when c runs again it prefills prompt + the token it had produced
    finish(sched, a)
    finish(sched, b)
    got = step(sched)
    assert got == {"c": 5}


def test_a_step_that_preempted_admits_nothing():
    """vLLM admits waiting requests only when nothing was preempted: otherwise the sequence just
    preempted (now at the head of the waiting queue) is re-admitted in the same step when a chunk
    of its recompute fits the blocks it freed, and preempted again later."""
    sched = make_scheduler(num_blocks=4, block_size=4, budget=16)
    make_request(sched, "a", 4)
    b = make_request(sched, "b", 8)
    assert step(sched) == {"a": 4, "b": 8}  # 3 blocks used, 1 free; each sampled a token
    sched.budget = 6  # a 5-token chunk of b's recompute would fit the 2 blocks b frees
    got = step(sched)  # a takes the free block; b cannot grow and is preempted
    assert sched.num_preemptions == 1 and b.status is Status.WAITING
    assert got == {"a": 1}  # b is not re-admitted in the step that preempted it
    assert step(sched).get("b") == 5  # the next step admits it again (recompute, chunked)


def test_blocks_are_freed_exactly_once():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seqs = [make_request(sched, f"r{i}", 6) for i in range(3)]
    step(sched)
    assert sched.blocks.num_free == 8 - 6
    sched.remove(seqs[0])
    sched.remove(seqs[0])  # a second release (abort after finish) frees nothing more
    assert sched.blocks.num_free == 8 - 4
    for s in seqs[1:]:
        finish(sched, s)
    assert sorted(sched.blocks.free_blocks()) == list(range(8))  # every block back, none twice


def test_preempted_blocks_come_back_once_and_nothing_leaks_under_pressure():
    sched = make_scheduler(num_blocks=6, block_size=2, budget=16, max_num_seqs=8)
    seqs = [make_request(sched, f"r{i}", 3) for i in range(5)]
    for _ in range(40):
        step(sched)
        for s in list(sched.running):
            if len(s.output_ids) >= 6:
                finish(sched, s)
        used = sum(len(s.table.blocks) for s in sched.running)
        assert used + sched.blocks.num_free == 6  # the free list and the tables partition the pool
        assert len(set(sched.blocks.free_blocks())) == len(sched.blocks.free_blocks())
    assert all(s.status is Status.FINISHED for s in seqs)
    assert sched.num_preemptions > 0
    assert sorted(sched.blocks.free_blocks()) == list(range(6))


def make_group(sched: Scheduler, group: str, count: int, prompt_len: int) -> list[Sequence]:
    """The `count` choices of one request: one group, sharing its share of each step."""
    seqs = []
    for i in range(count):
        seq = Sequence(
            f"{group}-{i}",
            list(range(3, 3 + prompt_len)),
            SamplingParams(max_tokens=64, temperature=0),
            sched.blocks.block_size,
            group=group,
        )
        sched.add(seq)
        seqs.append(seq)
    return seqs


def test_a_big_request_does_not_hold_every_slot_against_a_new_one():
    """n choices fill the sequence limit; a request that arrives later takes a slot from that group
    in its first step (fair share: the newest of the largest group is preempted and recomputes)."""
    sched = make_scheduler(max_num_seqs=4, num_blocks=64, budget=64)
    big = make_group(sched, "big", 8, 2)
    step(sched)
    assert len(sched.running) == 4 and all(s.group == "big" for s in sched.running)
    victim = make_request(sched, "small", 3)
    got = step(sched)
    assert got.get("small") == 3  # admitted and prefilled in the step after it arrived
    assert sched.num_fair_preemptions == 1 and len(sched.running) == 4
    assert sum(s.status is Status.RUNNING for s in big) == 3
    assert victim in sched.running
    # no thrashing: equal shares are left alone
    step(sched)
    assert sched.num_fair_preemptions == 1


def test_a_long_prefill_leaves_room_for_another_request_in_the_same_step():
    sched = make_scheduler(num_blocks=256, block_size=4, budget=16)
    make_group(sched, "long", 2, 200)
    step(sched)  # the long prompts alone: the whole budget
    make_request(sched, "short", 5)
    got = step(sched)
    assert got["short"] == 5  # the new request first (its group runs nothing yet)
    assert sum(got.values()) <= 16 and got.get("long-0", 0) > 0  # the rest goes on prefilling


def test_prefill_is_shared_round_robin_between_groups():
    sched = make_scheduler(num_blocks=256, block_size=4, budget=16)
    make_group(sched, "a", 3, 100)
    make_group(sched, "b", 1, 100)
    got = step(sched)
    by_group = {"a": sum(v for k, v in got.items() if k.startswith("a-")), "b": got.get("b-0", 0)}
    assert by_group == {"a": 8, "b": 8}  # one request with 3 prompts gets no more than one with 1
