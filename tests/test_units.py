"""Small units: backoff, templates and JSON output, job ids, wake-ups, intake validation."""

from __future__ import annotations

import random
import time
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import daemon.jobs
from daemon.analyzers import Analyzer, build_analyzers, fill_template, parse_json_output
from daemon.backoff import backoff_s
from daemon.config import AnalyzerConfig, Config, parse_config
from daemon.intake.submit import FieldError, Intake, IntakeClosed, SubmitError
from daemon.jobs import JobIds
from daemon.live import Live
from daemon.providers.base import OutputInvalid
from daemon.store.base import BacklogFull
from daemon.store.sqlite import Store
from daemon.wakeup import Wakeup

TIMEOUT_S = 20

# -- backoff -------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 8, 20])
def test_backoff_stays_within_its_ceiling(attempt: int) -> None:
    """Full jitter: every delay is in [0, min(max, base * 2^(n-1))], and spread out."""
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2 ** max(0, attempt - 1))
    delays = [backoff_s(attempt, base_s=0.5, max_s=30.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Jitter, not a constant: the samples cover most of the range.
    assert min(delays) < ceiling * 0.1
    assert max(delays) > ceiling * 0.9


def test_backoff_grows_then_caps() -> None:
    """The ceiling doubles per attempt until max_s: late attempts reach near max_s."""
    rng = random.Random(1)
    early = max(backoff_s(1, base_s=1.0, max_s=60.0, rng=rng) for _ in range(500))
    late = max(backoff_s(30, base_s=1.0, max_s=60.0, rng=rng) for _ in range(500))
    assert early <= 1.0
    assert 50.0 < late <= 60.0


def test_backoff_honours_the_hint() -> None:
    """A server's retry-after is never undercut, but max_s still caps it."""
    rng = random.Random(2)
    for _ in range(500):
        assert backoff_s(1, base_s=0.1, max_s=30.0, hint_s=7.0, rng=rng) >= 7.0
        assert backoff_s(1, base_s=0.1, max_s=30.0, hint_s=100.0, rng=rng) == 30.0
        assert backoff_s(10, base_s=1.0, max_s=30.0, hint_s=0.0, rng=rng) <= 30.0


def test_backoff_seeded_rng_is_deterministic() -> None:
    """The same seed gives the same delays; another seed gives others."""

    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff_s(n, base_s=1.0, max_s=60.0, rng=rng) for n in range(1, 20)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_backoff_without_rng_uses_the_module_random() -> None:
    """No rng argument still gives bounded delays."""
    assert all(0.0 <= backoff_s(3, base_s=1.0, max_s=2.0) <= 2.0 for _ in range(200))


# -- templates and JSON output -------------------------------------------------------


def test_fill_template_strings_as_is_others_as_json() -> None:
    """Strings go in verbatim (braces too); other values go in as compact JSON."""
    out = fill_template(
        "T={text} N={n} O={obj} B={flag} {{lit}}",
        {"text": "a {b} c", "n": 3, "obj": {"k": [1, None, "é"]}, "flag": True, "unused": 1},
    )
    assert out == 'T=a {b} c N=3 O={"k":[1,null,"é"]} B=true {lit}'


def test_fill_template_missing_field_raises() -> None:
    """A field the input lacks is an error, never an empty string."""
    with pytest.raises(KeyError):
        fill_template("{text}", {})


def test_parse_json_output_in_fences_and_prose() -> None:
    """The outermost object is taken out of code fences and surrounding prose."""
    content = 'Sure! Here it is:\n```json\n{"sentiment": "positive", "topics": {"a": 1}}\n```\n'
    assert parse_json_output(content, ["sentiment", "topics"]) == {
        "sentiment": "positive",
        "topics": {"a": 1},
    }
    assert parse_json_output('{"a": 1}', []) == {"a": 1}


def test_parse_json_output_missing_key_is_named() -> None:
    """A missing required key fails the output and names the key."""
    with pytest.raises(OutputInvalid, match="topics"):
        parse_json_output('{"sentiment": "ok"}', ["sentiment", "topics"])


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2, 3]",
        "42",
        '"just a string"',
        "no json here at all",
        "} backwards {",
        "{not: json}",
        "",
    ],
)
def test_parse_json_output_rejects_non_objects_and_garbage(content: str) -> None:
    """Anything that is not one JSON object is OutputInvalid, not another exception."""
    with pytest.raises(OutputInvalid):
        parse_json_output(content, [])


def test_analyzer_problems_name_the_missing_field() -> None:
    """An input lacking a prompt field is reported as `input.<field>`, naming the analyzer."""
    config = AnalyzerConfig(provider="p", model="m", prompt="{title}\n\n{text}")
    analyzer = Analyzer("summarize", config)
    problems = analyzer.problems({"title": "T"})
    assert [field for field, _ in problems] == ["input.text"]
    assert "summarize" in problems[0][1]
    assert analyzer.problems({"title": "T", "text": "x", "extra": 1}) == []


def test_handler_analyzer_needs_no_fields() -> None:
    """A handler analyzer has no template, so no input field is required."""
    analyzer = Analyzer("h", AnalyzerConfig(handler="pkg.mod:func"), handler=None)
    assert analyzer.problems({}) == []


# -- job ids -------------------------------------------------------------------------


def test_job_ids_sortable_unique_uuid7() -> None:
    """10k ids: strictly increasing as strings, unique, canonical UUIDv7 with now's time."""
    ids = JobIds()
    before_ms = time.time_ns() // 1_000_000
    values = [ids.new() for _ in range(10_000)]
    after_ms = time.time_ns() // 1_000_000
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    for value in values:
        parsed = uuid.UUID(value)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value
    first_ms = uuid.UUID(values[0]).int >> 80
    last_ms = uuid.UUID(values[-1]).int >> 80
    assert before_ms <= first_ms <= last_ms <= after_ms


def test_job_ids_stay_ordered_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one millisecond or after a step back, ids still count up."""
    clock = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 6_000_000_000, 6_000_000_000])
    monkeypatch.setattr(daemon.jobs, "time", types.SimpleNamespace(time_ns=lambda: next(clock)))
    ids = JobIds()
    values = [ids.new() for _ in range(5)]
    assert values == sorted(values)
    assert len(set(values)) == 5
    assert [uuid.UUID(v).int >> 80 for v in values] == [5000, 5000, 5000, 6000, 6000]


# -- wake-ups ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wakeup_times_out_without_notify() -> None:
    """With no notify, wait() returns False when its timeout passes."""
    with anyio.fail_after(TIMEOUT_S):
        assert await Wakeup().wait(0.01) is False


@pytest.mark.anyio
async def test_wakeup_is_level_free() -> None:
    """A notify with nobody waiting is not remembered."""
    with anyio.fail_after(TIMEOUT_S):
        wakeup = Wakeup()
        wakeup.notify()
        assert await wakeup.wait(0) is False


@pytest.mark.anyio
async def test_wakeup_wakes_every_waiter() -> None:
    """notify() wakes everyone waiting, then re-arms for the next round."""
    with anyio.fail_after(TIMEOUT_S):
        wakeup = Wakeup()
        woke: list[bool] = []

        async def waiter() -> None:
            woke.append(await wakeup.wait(TIMEOUT_S))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            wakeup.notify()
        assert woke == [True, True, True]
        assert await wakeup.wait(0) is False


# -- intake --------------------------------------------------------------------------

INTAKE_CONFIG = """
[queue]
max_input_bytes = 200
max_backlog = 5

[providers.sim]
kind = "simulated"

[analyzers.summarize]
provider = "sim"
model = "m"
prompt = "Summarize: {text}"
max_attempts = 4

[analyzers.compare]
provider = "sim"
model = "m"
prompt = "Compare {left} with {right}"
"""


def make_live(text: str = INTAKE_CONFIG) -> Live:
    """The live config and analyzers, as the daemon builds them."""
    config: Config = parse_config(text)
    return Live(config, build_analyzers(config))


def errors_of(intake: Intake, raw: Any) -> list[FieldError]:
    """The field errors that validating `raw` must raise."""
    with pytest.raises(SubmitError) as info:
        intake.validate(raw, "test")
    return info.value.errors


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open store on a fresh database file."""
    async with Store(tmp_path / "vigil.db", synchronous="NORMAL") as opened:
        yield opened


@pytest.fixture
async def intake(store: Store) -> Intake:
    """An Intake over a real store and the test analyzers."""
    return Intake(store, make_live())


def text_job(text: str = "hello", **extra: Any) -> dict[str, Any]:
    """A valid job for the `summarize` analyzer."""
    return {"analyzer": "summarize", "input": {"text": text}, **extra}


@pytest.mark.anyio
async def test_validate_builds_new_jobs(intake: Intake) -> None:
    """A valid job becomes a NewJob with the analyzer's attempt budget and the source."""
    [job] = intake.validate(text_job(priority=3, idempotency_key="k"), "socket")
    assert (job.analyzer, job.input, job.priority) == ("summarize", {"text": "hello"}, 3)
    assert (job.idempotency_key, job.max_attempts, job.source) == ("k", 4, "socket")
    assert uuid.UUID(job.id).version == 7


@pytest.mark.anyio
async def test_validate_unknown_analyzer_is_named(intake: Intake) -> None:
    """An unknown analyzer is rejected on `analyzer`, naming it and the known ones."""
    [error] = errors_of(intake, {"analyzer": "sumarize", "input": {"text": "x"}})
    assert (error.index, error.field) == (None, "analyzer")
    assert "sumarize" in error.message
    assert "summarize" in error.message


@pytest.mark.anyio
async def test_validate_input_must_be_an_object(intake: Intake) -> None:
    """An input that is not an object is rejected on `input`."""
    [error] = errors_of(intake, {"analyzer": "summarize", "input": ["text"]})
    assert error.field == "input"
    assert "object" in error.message


@pytest.mark.anyio
async def test_validate_missing_analyzer_is_required(intake: Intake) -> None:
    """A job without `analyzer` is rejected on that field as required."""
    [error] = errors_of(intake, {"input": {"text": "x"}})
    assert (error.field, error.message) == ("analyzer", "required")


@pytest.mark.anyio
async def test_validate_unknown_job_field_is_named(intake: Intake) -> None:
    """A typo in the job object itself is rejected, naming the key."""
    [error] = errors_of(intake, text_job(priorty=1))
    assert (error.field, error.message) == ("priorty", "unknown field")


@pytest.mark.anyio
async def test_validate_oversize_input_names_the_limit(intake: Intake) -> None:
    """Input over queue.max_input_bytes is rejected, naming the setting."""
    [error] = errors_of(intake, text_job("x" * 300))
    assert error.field == "input"
    assert "queue.max_input_bytes" in error.message
    intake.validate(text_job("x" * 150), "test")  # under the limit is fine


@pytest.mark.anyio
async def test_validate_missing_template_field_is_named(intake: Intake) -> None:
    """An input lacking a field the prompt needs is rejected on `input.<field>`."""
    errors = errors_of(intake, {"analyzer": "compare", "input": {"left": "a"}})
    assert [e.field for e in errors] == ["input.right"]


@pytest.mark.anyio
async def test_validate_list_points_at_the_bad_item(intake: Intake) -> None:
    """In a list, the error's index is the bad item's, and the message says so."""
    raw = [text_job(), text_job(), {"analyzer": "compare", "input": {"left": "a"}}, text_job()]
    with pytest.raises(SubmitError) as info:
        intake.validate(raw, "test")
    assert [(e.index, e.field) for e in info.value.errors] == [(2, "input.right")]
    assert str(info.value).startswith("job 2: input.right")


@pytest.mark.anyio
async def test_validate_empty_list_and_non_object(intake: Intake) -> None:
    """An empty list and a bare string are rejected, not crashed on."""
    [empty] = errors_of(intake, [])
    assert empty.field == "jobs"
    [bare] = errors_of(intake, "summarize")
    assert bare.index is None
    assert "object" in bare.message


@pytest.mark.anyio
async def test_submit_commits_a_valid_batch(intake: Intake, store: Store) -> None:
    """A valid list is committed whole and counted as accepted."""
    with anyio.fail_after(TIMEOUT_S):
        out = await intake.submit([text_job(f"doc {i}") for i in range(3)], "test")
        assert all(s.created for s in out)
        assert len({s.id for s in out}) == 3
        assert store.counts["queued"] == 3
        assert intake.accepted == 3
        again = await intake.submit(text_job(idempotency_key="k"), "test")
        repeat = await intake.submit(text_job(idempotency_key="k"), "test")
        assert repeat[0].id == again[0].id
        assert not repeat[0].created
        assert intake.accepted == 4


@pytest.mark.anyio
async def test_submit_with_one_bad_item_inserts_nothing(intake: Intake, store: Store) -> None:
    """One invalid item refuses the whole request: nothing reaches the store."""
    with anyio.fail_after(TIMEOUT_S):
        with pytest.raises(SubmitError):
            await intake.submit([text_job(), {"analyzer": "nope", "input": {}}], "test")
        assert await store.list_jobs() == []
        assert store.counts["queued"] == 0
        assert intake.accepted == 0


@pytest.mark.anyio
async def test_submit_over_the_backlog_inserts_nothing(intake: Intake, store: Store) -> None:
    """A batch that would pass queue.max_backlog is refused whole."""
    with anyio.fail_after(TIMEOUT_S):
        await intake.submit([text_job() for _ in range(3)], "test")
        with pytest.raises(BacklogFull):
            await intake.submit([text_job() for _ in range(3)], "test")
        assert len(await store.list_jobs()) == 3
        assert intake.accepted == 3


@pytest.mark.anyio
async def test_submit_when_closed_is_refused(intake: Intake, store: Store) -> None:
    """A closed intake (draining) refuses with its reason and writes nothing."""
    with anyio.fail_after(TIMEOUT_S):
        intake.closed_reason = "draining"
        with pytest.raises(IntakeClosed, match="draining"):
            await intake.submit(text_job(), "test")
        assert await store.list_jobs() == []
