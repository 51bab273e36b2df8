"""The Data Buffer on its own: order, exactly-once, staleness, backpressure and resume, with tiny factories."""

from __future__ import annotations

import copy

import pytest

from sluice.buffer import BufferFull, DataBuffer
from sluice.data import PromptSource
from sluice.types import Sample, SampleGroup, Status

NUM_PROMPTS = 6
N_SAMPLES = 2


def make_source(num_prompts: int = NUM_PROMPTS, shuffle: bool = True) -> PromptSource:
    prompts = [Sample(prompt=f"p{i}", prompt_tokens=[i], tokens=[i], label=str(i)) for i in range(num_prompts)]
    return PromptSource(prompts, shuffle=shuffle, seed=3)


def make_buffer(max_staleness: int = 0, max_held_groups: int = 64, shuffle: bool = True) -> DataBuffer:
    return DataBuffer(make_source(shuffle=shuffle), N_SAMPLES, max_staleness, max_held_groups)


def generate(groups: list[SampleGroup], version: int) -> list[SampleGroup]:
    """What a rollout does: one response token per sample, tagged with the engine's weight version."""
    for group in groups:
        for sample in group.samples:
            sample.tokens = sample.prompt_tokens + [100]
            sample.response_length = 1
            sample.weight_versions.append(version)
            sample.status, sample.reward = Status.COMPLETED, 1.0
    return groups


def prompts_of(groups: list[SampleGroup]) -> list[str]:
    return [g.prompt for g in groups]


def test_groups_have_n_copies_of_each_prompt_and_every_prompt_once_per_epoch():
    buffer = make_buffer()
    groups = buffer.get_prompt_groups(4) + buffer.get_prompt_groups(2)
    assert all(len(g.samples) == N_SAMPLES and {s.prompt for s in g.samples} == {g.prompt} for g in groups)
    assert sorted(prompts_of(groups)) == [f"p{i}" for i in range(NUM_PROMPTS)]
    assert prompts_of(groups) == [s.prompt for s in make_source().next_batch(NUM_PROMPTS)]  # the source's order
    assert len({g.group_id for g in groups}) == NUM_PROMPTS and buffer.num_in_flight == NUM_PROMPTS


def test_requeued_groups_come_first_with_their_partial_tokens():
    buffer = make_buffer()
    first = buffer.get_prompt_groups(3)
    partial = first[1]
    partial.samples[0].tokens = partial.samples[0].prompt_tokens + [7, 8]
    partial.samples[0].status = Status.ABORTED
    buffer.requeue([partial])
    buffer.put_finished(generate([first[0], first[2]], version=0))
    again = buffer.get_prompt_groups(2)
    assert again[0].group_id == partial.group_id and again[0].samples[0].tokens[-2:] == [7, 8]
    assert again[0].samples[0].status == Status.ABORTED
    assert again[1].prompt == make_source().next_batch(4)[3].prompt  # then the next new prompt
    rest = buffer.get_prompt_groups(NUM_PROMPTS - 4)
    trained = first[0:1] + first[2:3] + again + rest
    assert sorted(prompts_of(trained)) == [f"p{i}" for i in range(NUM_PROMPTS)]  # none lost, none twice


def test_returning_a_group_twice_or_one_never_handed_out_is_refused():
    buffer = make_buffer()
    group = buffer.get_prompt_groups(1)[0]
    buffer.put_finished(generate([group], version=0))
    with pytest.raises(ValueError, match="not in flight"):
        buffer.put_finished([group])
    with pytest.raises(ValueError, match="not in flight"):
        buffer.requeue([SampleGroup([Sample(prompt="x")])])


def test_untagged_samples_get_the_version_they_were_handed_out_at():
    buffer = make_buffer(max_staleness=5)
    buffer.set_weight_version(3)
    group = buffer.get_prompt_groups(1)[0]
    buffer.set_weight_version(4)
    buffer.put_finished([group])  # a generate function that tags nothing
    assert [s.weight_versions for s in group.samples] == [[3], [3]]
    assert group.policy_version == 3


def test_on_policy_takes_only_current_groups_and_regenerates_stale_ones():
    buffer = make_buffer(max_staleness=0)
    old = buffer.get_prompt_groups(2)
    buffer.put_finished(generate(old, version=0))
    buffer.set_weight_version(1)
    current = buffer.get_prompt_groups(2)
    buffer.put_finished(generate(current, version=1))
    taken = buffer.take_train_groups(4, trainer_version=1)
    assert [g.group_id for g in taken] == [g.group_id for g in current]
    assert buffer.num_stale_requeued == 2 and buffer.num_requeued == 2
    regenerated = buffer.get_prompt_groups(2)  # the stale prompts, fresh: no tokens of the old policy kept
    assert prompts_of(regenerated) == prompts_of(old)
    assert all(s.tokens == s.prompt_tokens and not s.weight_versions and s.status == Status.PENDING
               for g in regenerated for s in g.samples)


def test_staleness_one_trains_a_group_one_version_behind_but_not_two():
    buffer = make_buffer(max_staleness=1)
    groups = buffer.get_prompt_groups(3)
    generate(groups[0:1], version=0)
    generate(groups[1:2], version=1)
    generate(groups[2:3], version=2)
    groups[1].samples[1].weight_versions = [0, 2]  # a sample whose tokens span versions: the oldest counts
    buffer.put_finished(groups)
    taken = buffer.take_train_groups(3, trainer_version=2)
    assert [g.group_id for g in taken] == [groups[2].group_id]
    assert buffer.num_stale_requeued == 2


def test_backpressure_bounds_groups_in_flight_and_finished():
    buffer = make_buffer(max_held_groups=4)
    groups = buffer.get_prompt_groups(3)
    assert buffer.num_free_slots == 1
    with pytest.raises(BufferFull, match="at most 4"):
        buffer.get_prompt_groups(2)
    buffer.put_finished(generate(groups, version=0))
    with pytest.raises(BufferFull):
        buffer.get_prompt_groups(2)
    assert len(buffer.take_train_groups(2, trainer_version=0)) == 2
    assert buffer.num_free_slots == 3 and len(buffer.get_prompt_groups(3)) == 3


def test_put_finished_refuses_more_than_the_bound_without_taking_any():
    buffer = make_buffer(max_held_groups=2)
    groups = buffer.get_prompt_groups(2)
    buffer._finished.append(SampleGroup([]))  # a caller that ignored num_free_slots, simulated
    with pytest.raises(BufferFull, match="do not fit"):
        buffer.put_finished(generate(groups, version=0))
    assert buffer.num_in_flight == 2 and buffer.num_finished == 1  # all or nothing


def test_state_dict_mid_flight_round_trip_loses_and_duplicates_nothing():
    buffer = make_buffer(max_staleness=1)
    buffer.set_weight_version(2)
    groups = buffer.get_prompt_groups(5)
    buffer.put_finished(generate(groups[0:2], version=2))  # finished, not trained yet
    aborted = groups[2]
    aborted.samples[0].tokens = aborted.samples[0].prompt_tokens + [9]
    buffer.requeue([aborted])  # partial, waiting
    in_flight = groups[3:5]  # still generating when the checkpoint is taken
    state = copy.deepcopy(buffer.state_dict())

    resumed = make_buffer(max_staleness=1)
    resumed.load_state_dict(state)
    assert resumed.weight_version == 2 and resumed.num_in_flight == 0
    assert resumed.num_finished == 2 and resumed.num_requeued == 3
    handed = resumed.get_prompt_groups(4)
    # in-flight groups first (as handed out), then the requeued partial group, then the next new prompt
    assert [g.group_id for g in handed[:3]] == [g.group_id for g in in_flight] + [aborted.group_id]
    assert handed[2].samples[0].tokens[-1] == 9
    assert handed[3].group_id == 5 and handed[3].prompt == make_source().next_batch(6)[5].prompt
    resumed.put_finished(generate(handed, version=2))
    trained = resumed.take_train_groups(10, trainer_version=2)
    assert sorted(prompts_of(trained)) == [f"p{i}" for i in range(NUM_PROMPTS)]
    assert len({g.group_id for g in trained}) == NUM_PROMPTS
    assert resumed.get_prompt_groups(1)[0].prompt == make_source().next_batch(7)[6].prompt  # epoch 2 goes on


def test_a_stale_group_after_resume_is_regenerated_from_its_saved_prompt():
    buffer = make_buffer(max_staleness=0)
    groups = buffer.get_prompt_groups(1)
    buffer.put_finished(generate(groups, version=0))
    resumed = make_buffer(max_staleness=0)
    resumed.load_state_dict(buffer.state_dict())
    assert resumed.take_train_groups(1, trainer_version=1) == []
    assert prompts_of(resumed.get_prompt_groups(1)) == prompts_of(groups)


def test_an_old_checkpoint_holding_only_the_source_cursor_loads():
    source = make_source()
    source.next_batch(4)
    buffer = make_buffer()
    buffer.load_state_dict(source.state_dict())
    assert buffer.source.num_consumed == 4 and buffer.num_requeued == 0
    assert buffer.get_prompt_groups(1)[0].prompt == make_source().next_batch(5)[4].prompt


def test_a_state_from_another_group_size_is_refused():
    state = make_buffer().state_dict()
    with pytest.raises(ValueError, match="samples per prompt"):
        DataBuffer(make_source(), N_SAMPLES + 1).load_state_dict(state)


def test_untracked_next_batch_serves_requeued_prompts_first():
    buffer = make_buffer(shuffle=False)
    group = buffer.get_prompt_groups(1)[0]
    buffer.requeue([group])
    assert [s.prompt for s in buffer.next_batch(2)] == ["p0", "p1"]
    assert buffer.num_requeued == 0 and buffer.source.num_consumed == 2
