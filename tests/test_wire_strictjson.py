"""wire.strictjson: the one strict JSON parser (QMP messages; the guest state document next)."""

from __future__ import annotations

import json

import pytest

from virtio_lm.errors import StrictJsonError, VirtioLmError
from virtio_lm.wire import strictjson


@pytest.mark.parametrize("text, want", [
    ('{"a": 1, "b": [1.5, null, true, "x"]}', {"a": 1, "b": [1.5, None, True, "x"]}),
    ('{"a": {"a": 1}}', {"a": {"a": 1}}),  # the same key at two levels is not a duplicate
    ("[]", []),
    ('"s"', "s"),
    ("1e308", 1e308),
])
def test_takes_json(text, want):
    assert strictjson.loads(text) == want
    assert json.loads(text) == want  # the same result as the lenient parser when both take it


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('[{"x": {"k": 1, "k": 1}}]', "duplicate key 'k'"),
    ('{"b": 1, "a": 1, "a": 2, "b": 2}', "duplicate key 'a'"),  # the first key seen twice
    ('{"a": NaN}', "invalid keyword 'NaN'"),
    ("[Infinity]", "invalid keyword 'Infinity'"),
    ("-Infinity", "invalid keyword '-Infinity'"),
])
def test_refuses_what_json_loads_would_take(text, message):
    json.loads(text)  # the control: Python's own parser takes it
    with pytest.raises(StrictJsonError) as info:
        strictjson.loads(text)
    assert str(info.value) == message
    assert isinstance(info.value, VirtioLmError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ['{"a": 1', "{'a': 1}", "", '{"a": 1} x'])
def test_malformed_text_is_a_decode_error_not_a_strictness_error(text):
    with pytest.raises(json.JSONDecodeError):
        strictjson.loads(text)
