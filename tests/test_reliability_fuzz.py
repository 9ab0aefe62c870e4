"""Property-based fuzzing of what users type (issue 18): batch lines and command-line options.

No input crashes: every bad value gets one line that names what is wrong (``error: ...`` from
the project, or click's ``Error: Invalid value for '--flag'``), before any model loads or the
hosted API is reached (the expensive steps are replaced by a stand-in that says it was reached);
every line a batch accepts can be written back as strict UTF-8 JSON with the same id. The
HTTP servers are fuzzed elsewhere.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from blackbox_proxy import ConfigurationError
from blackbox_proxy.apps.batch import id_key
from blackbox_proxy.runs.inputs import parse_line as _parse_line
from blackbox_proxy.apps.cli import main
from blackbox_proxy.apps.openai_http import free_port
from blackbox_proxy.maths import combiner
from blackbox_proxy.request import OPTION_NAMES, STRATEGIES

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="hypothesis-"))  # its caches stay out of the checkout
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
REACHED = "REACHED-THE-EXPENSIVE-STEP"

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc80", "\udcff", "\udfff"])
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=12)
NUMBERS = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.integers(-3, 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, 1.0, 0.5, 1e-320, 1e308]))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=8)

PLAIN = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
# values a field takes when it is right, so that accepted lines are written too
VALID = {
    "max_tokens": st.integers(1, 64), "alpha": st.floats(-100, 100), "temperature": st.floats(0, 1e300),
    "top_p": st.floats(1e-9, 1.0), "seed": st.integers(-(2 ** 63), 2 ** 63 - 1),
    "stop": st.lists(PLAIN.filter(bool), max_size=3), "strategy": st.just("per-step"), "chunk": st.integers(1, 64),
    "samples": st.none(), "tail_calls": st.integers(0, 8), "drafts": st.integers(1, 16), "prompt": PLAIN.filter(str.strip), "id": st.one_of(PLAIN.filter(bool), st.integers()),
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": PLAIN.filter(str.strip)}),
                         min_size=1, max_size=2),
    "ref": st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), PLAIN),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(PLAIN, inner, max_size=3),
                        max_leaves=6),
}

# what a message must mention when a field is wrong
NAMES = {**{name: (name,) for name in OPTION_NAMES}, "prompt": ("prompt",), "messages": ("message",),
         "id": ("id",), "ref": ("'ref",)}
NAMES["stop"] = ("stop",)


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} written: not JSON")

    return json.loads(text, parse_constant=refuse)


# ----- batch lines -----------------------------------------------------------------------------------


@FUZZ
@given(fields=st.lists(st.sampled_from(sorted(NAMES)), min_size=1, max_size=3, unique=True), data=st.data())
def test_a_line_is_accepted_or_refused_in_one_line_naming_the_field(fields, data):
    changes = {field: data.draw(st.one_of(VALID[field], JSON), label=field) for field in fields}
    from blackbox_proxy.apps.batch import json_line

    line = {"id": "q", "prompt": "2+2=", **changes}
    if "messages" in changes and "prompt" not in changes:
        del line["prompt"]
    raw = json.dumps(line, ensure_ascii=True)
    try:
        item = _parse_line(raw, 7)
        item.request({})
    except (ValueError, ConfigurationError) as exc:
        event("refused")
        one_line(str(exc))
        wanted = [alias for field in changes for alias in NAMES[field]]
        assert any(alias in str(exc) for alias in wanted), (str(exc), sorted(changes))
        return
    event("accepted")
    written = json_line({"id": item.id, "text": "t", "finish_reason": "stop", **item.extra})
    written.encode("utf-8")  # never a UnicodeEncodeError after the prompt was paid for
    assert id_key(strict(written)["id"]) == item.key  # the resume reads the same id back


@FUZZ
@given(raw=st.one_of(TEXT, st.builds(lambda a, b: a + b, st.sampled_from(['{"id": 1, "prompt": ', '[', '{"a":']),
                                     TEXT)))
def test_any_text_as_a_line_is_refused_in_one_line(raw):
    try:
        _parse_line(raw, 1)
    except ValueError as exc:
        one_line(str(exc))


# ----- the maths behind every accepted value ------------------------------------------------------------


@FUZZ
@given(scores=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=8),
       temperature=st.one_of(st.just(0.0), st.floats(min_value=5e-324, max_value=1e308)),
       top_p=st.floats(min_value=1e-6, max_value=1.0))
def test_the_tuned_distribution_is_always_a_distribution(scores, temperature, top_p):
    probs = combiner.tuned_distribution(torch.tensor(scores, dtype=torch.float64), temperature, top_p)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and float(probs.sum()) == pytest.approx(1.0)
    assert 0 <= combiner.choose(probs, torch.Generator().manual_seed(0)) < len(scores)


# ----- command-line options ------------------------------------------------------------------------------


class Reached:
    """Stands in for the expensive step (a tuner, the hosted probe, a model load)."""

    def __init__(self, *args, **kwargs):
        raise ConfigurationError(REACHED)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ConfigurationError(REACHED)


@pytest.fixture(scope="module")
def stubbed():
    from blackbox_proxy import tuner, whitebox
    from blackbox_proxy.hosts import client
    from blackbox_proxy.local import runner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuner, "ProxyTuner", Reached)
        patch.setattr(whitebox, "WhiteBoxTuner", Reached)
        patch.setattr(client, "HostedClient", Reached)
        patch.setattr(runner.ModelRunner, "from_pretrained", Reached.from_pretrained)
        yield


def number_text():
    return st.one_of(NUMBERS.map(repr), st.sampled_from(["nan", "inf", "-inf", "1e-320", "1e308", "18446744073709551616",
                                                          "", "x", "0x10", "1_000"]))


def check_cli(args: list[str], changed: list[str], secret: str | None = None) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert result.exit_code in (1, 2), (args, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1 and "Traceback" not in result.output, (args, result.output)
    if secret and len(secret.strip()) >= 8:
        assert secret.strip() not in result.output
    message = errors[0]
    event(f"exit {result.exit_code}: " + ("reached the expensive step" if REACHED in message else "refused"))
    if REACHED in message:
        return
    names = [alias for flag in changed for alias in (flag, flag.lstrip("-").replace("-", "_"),
                                                       {"--base": "white-box"}.get(flag, flag))]
    names += ["prompt"] if "--prompt" in changed else []
    assert any(name in message for name in names), (message, changed)


GENERATE_FLAGS = {
    "--max-tokens": number_text(), "--alpha": number_text(), "--temperature": number_text(),
    "--top-p": number_text(), "--seed": number_text(), "--chunk": number_text(), "--samples": number_text(),
    "--stop": TEXT, "--strategy": st.one_of(st.sampled_from([*STRATEGIES, "white-box"]), TEXT),
    "--prompt": TEXT, "--base": st.just("no-such-model"), "--timeout": number_text(),
}


@FUZZ
@given(flags=st.dictionaries(st.sampled_from(sorted(GENERATE_FLAGS)), st.just(None), min_size=1, max_size=4),
       data=st.data())
def test_generate_options(stubbed, flags, data):
    values = {flag: data.draw(GENERATE_FLAGS[flag], label=flag) for flag in flags}
    args = ["generate", "--base-url", "http://127.0.0.1:9/v1", "--model", "tiny", "--anti-expert", "A",
            "--expert", "E"]
    if "--prompt" not in values:
        args += ["--prompt", "2+2="]
    for flag, value in values.items():
        args += [flag, value]
    changed = list(values) + (["--strategy"] if "--base" in values else [])
    check_cli(args, changed)


SERVE_FLAGS = {
    "--alpha": number_text(), "--strategy": st.one_of(st.sampled_from(STRATEGIES), TEXT), "--chunk": number_text(),
    "--max-tokens": number_text(), "--max-tokens-limit": number_text(), "--port": number_text(),
    "--api-key": st.one_of(TEXT, st.just("  "), st.just("sk-fuzz-0123456789")),
}


@FUZZ
@given(flags=st.dictionaries(st.sampled_from(sorted(SERVE_FLAGS)), st.just(None), min_size=1, max_size=3),
       data=st.data())
def test_serve_options(stubbed, flags, data):
    values = {flag: data.draw(SERVE_FLAGS[flag], label=flag) for flag in flags}
    args = ["serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "tiny", "--anti-expert", "A", "--expert", "E"]
    if "--port" not in values:
        args += ["--port", str(free_port())]
    for flag, value in values.items():
        args += [flag, value]
    changed = list(values) + (["--max-tokens", "--max-tokens-limit"] if {"--max-tokens", "--max-tokens-limit"} & set(values)
                              else [])
    check_cli(args, changed, values.get("--api-key"))


# hosts that resolve, or fail, without a DNS query (the tests reach nothing beyond 127.0.0.1)
HOSTS = st.sampled_from(["127.0.0.1", "::1", "localhost", "0.0.0.0", "192.0.2.1", "a" * 64 + ".example", "\udcff",
                         "host\x00name"])


@FUZZ
@given(port=st.one_of(number_text(), st.integers(1, 65535).map(str)), host=HOSTS,
       top=st.one_of(number_text(), st.integers(0, 50).map(str)), key=st.one_of(st.none(), TEXT, st.just("sk-fuzz-0123456789")))
def test_serve_model_options(stubbed, port, host, top, key):
    args = ["serve-model", "tiny", "--port", port, "--host", host, "--max-top-logprobs", top]
    if key is not None:
        args += ["--api-key", key]
    check_cli(args, ["--port", "--host", "--max-top-logprobs", "--api-key", "port", "host"], key)
