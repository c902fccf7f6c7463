"""The registry client's pure parts, without a network: Retry-After, challenges, backoff, the retry loop's bounds,
and Content-Range checks."""

import email.utils
import time

import pytest
import requests

from dutils.errors import Error
from dutils.reference import parse_reference
from dutils.registry import PROGRESS, Deadline, Registry, RetryPolicy, check_range, parse_challenge, retry_after
from dutils.transport import Retryable

NO_WAIT = RetryPolicy(base_delay=0.0, max_delay=0.0)


def response(**headers: str) -> requests.Response:
    made = requests.Response()
    made.headers.update(headers)
    return made


# -- Retry-After


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("120", 120.0), (" 7 ", 7.0), (None, None)])
def test_retry_after_in_seconds(value, seconds):
    assert retry_after({"Retry-After": value} if value is not None else {}) == seconds


@pytest.mark.parametrize("value", ["soon", "-5", "1e5", "\u0669", "Mon, 01 Jan 99999 00:00:00 GMT", "\x1b[2J"])
def test_a_retry_after_that_is_neither_seconds_nor_a_date_is_one_line(value):
    with pytest.raises(Error, match="Retry-After that is neither seconds nor a date") as caught:
        retry_after({"Retry-After": value})
    assert "\x1b" not in str(caught.value)


def test_retry_after_as_an_http_date():
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after({"Retry-After": later}) <= 60
    earlier = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after({"Retry-After": earlier}) == 0.0


# -- WWW-Authenticate


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"',
            "bearer",
            {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:a/b:pull"},
        ),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ('BEARER  realm="r", error="invalid_token"', "bearer", {"realm": "r", "error": "invalid_token"}),
        ("", "", {}),
        ("Negotiate", "negotiate", {}),
    ],
)
def test_parse_challenge(header, scheme, params):
    assert parse_challenge(header) == (scheme, params)


# -- backoff


def test_delay_grows_with_jitter_up_to_a_ceiling():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = [policy.delay(attempt, None) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)


def test_delay_honours_retry_after_up_to_max_wait():
    policy = RetryPolicy(max_wait=60.0)
    assert policy.delay(0, 5.0) == 5.0
    assert policy.delay(3, 3600.0) == 60.0


def test_the_stall_window_never_exceeds_the_patience():
    assert RetryPolicy().window == 30.0
    assert RetryPolicy(patience=3).window == 3


# -- the retry loop


def registry(policy: RetryPolicy = NO_WAIT) -> Registry:
    return Registry(parse_reference("registry.example/app"), retry=policy)


def test_retries_are_bounded_in_count_and_name_the_reason():
    calls = []

    def attempt():
        calls.append(1)
        raise Retryable("HTTP 503")

    with pytest.raises(Error) as caught:
        registry().retrying("manifest x", attempt)
    assert len(calls) == NO_WAIT.attempts
    assert "giving up on manifest x after 6 attempts" in str(caught.value) and "HTTP 503" in str(caught.value)


def test_progress_forgives_failures_but_going_back_and_forth_does_not():
    """Kept bytes that only return to where they were (a server whose ranges lie) are not progress."""
    kept = [0]
    offsets = iter([PROGRESS * 2, 0, PROGRESS * 2, 0, PROGRESS * 2, 0, PROGRESS * 2, 0, PROGRESS * 2] * 3)
    calls = []

    def attempt():
        calls.append(1)
        kept[0] = next(offsets)
        raise Retryable("the connection closed early")

    with pytest.raises(Error):
        registry().retrying("blob", attempt, kept=lambda: kept[0])
    assert len(calls) == NO_WAIT.attempts  # the first attempt's progress forgave nothing after it


def test_steady_progress_keeps_a_transfer_going():
    kept = [0]

    def attempt():
        kept[0] += PROGRESS
        if kept[0] < PROGRESS * 20:
            raise Retryable("cut")
        return "done"

    assert registry().retrying("blob", attempt, kept=lambda: kept[0]) == "done"


def test_no_progress_for_longer_than_the_patience_gives_up_before_the_attempts_run_out():
    def attempt():
        time.sleep(0.3)
        raise Retryable("stalled")

    started = time.monotonic()
    with pytest.raises(Error) as caught:
        registry(RetryPolicy(base_delay=0.0, max_delay=0.0, patience=0.5)).retrying("blob", attempt)
    assert time.monotonic() - started < 2
    assert "after 2 attempts" in str(caught.value) and "without progress" in str(caught.value)


def test_a_final_error_is_not_retried():
    calls = []

    def attempt():
        calls.append(1)
        raise Error("cannot verify the TLS certificate")

    with pytest.raises(Error):
        registry().retrying("x", attempt)
    assert calls == [1]


# -- Content-Range


@pytest.mark.parametrize("header", ["bytes 100-199/200", "bytes 100-199/*"])
def test_a_range_from_the_offset_asked_for_is_accepted(header):
    check_range(response(**{"Content-Range": header}), 100)


@pytest.mark.parametrize("header", ["bytes 0-199/200", "bytes 99-199/200", "bytes */200", "", "items 100-"])
def test_any_other_range_is_retryable(header):
    with pytest.raises(Retryable):
        check_range(response(**{"Content-Range": header}), 100)


# -- the deadline: every wait bounded by what is left of --timeout


def test_the_deadline_bounds_connect_and_read_timeouts_by_what_is_left():
    deadline = Deadline(10.0)
    connect, read = deadline.timeouts(30.0)
    assert 9 < connect <= 10 and 9 < read <= 10
    deadline.end = time.monotonic() + 2
    assert all(t <= 2 for t in deadline.timeouts(30.0))
    deadline.end = time.monotonic() - 1
    with pytest.raises(Retryable, match="no time left"):
        deadline.timeouts(30.0)
    deadline.renew()
    assert deadline.left() > 9


def test_a_retry_after_longer_than_what_is_left_gives_up_at_once():
    calls = []

    def attempt():
        calls.append(1)
        raise Retryable("HTTP 503", retry_after=600.0)

    started = time.monotonic()
    with pytest.raises(Error, match="waiting 600 s more would pass --timeout"):
        registry(RetryPolicy(patience=60)).retrying("manifest x", attempt)
    assert calls == [1] and time.monotonic() - started < 5
