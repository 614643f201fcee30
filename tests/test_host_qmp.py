"""The QMP monitor: sans-I/O protocol, argument checking, and a real server driven
by the real ``qemu.qmp`` client library plus raw sockets for hostile clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm import __version__
from virtio_lm.errors import (
    CommandRegistrationError,
    MonitorAddressError,
    MonitorError,
    QmpError,
    QmpLimitError,
    StateTransitionError,
)
from virtio_lm.host.qmp import (
    ALREADY_NEGOTIATED_DESC,
    NEGOTIATION_DESC,
    QEMU_COMPAT_VERSION,
    CommandTable,
    MonitorAddress,
    QmpConnection,
    QmpServer,
    make_event,
)

qmp_lib = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402


# --------------------------------------------------------------------------- helpers
def msgs(data: bytes) -> list[dict]:
    """Split server output into messages; every one must be CRLF-terminated JSON."""
    assert data == b"" or data.endswith(b"\r\n")
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def one(data: bytes) -> dict:
    out = msgs(data)
    assert len(out) == 1, out
    return out[0]


def req(command: str, arguments: dict | None = None, **extra) -> bytes:
    m: dict = {"execute": command}
    if arguments is not None:
        m["arguments"] = arguments
    m.update(extra)
    return json.dumps(m).encode()


def make_table() -> CommandTable:
    t = CommandTable()
    t.register("echo", lambda a: a, args_schema={
        "s": "str", "*i": "int", "*u": "uint64", "*z": "size", "*n": "number", "*b": "bool",
        "*any": "any", "*obj": "object", "*list": ["int"], "*mode": ("push", "pull"),
        "*nested": {"rate": "uint64", "*name": "str"},
    })
    t.register("noargs", lambda a: None)
    t.register("not-found", lambda a: (_ for _ in ()).throw(QmpError("no VF 9", "DeviceNotFound")))
    t.register("refused", lambda a: (_ for _ in ()).throw(StateTransitionError("RUNNING", "FREEZED")))
    t.register("buggy", lambda a: 1 / 0)
    t.register("not-json", lambda a: {"x": object()})
    return t


def negotiated(table: CommandTable | None = None, **kw) -> QmpConnection:
    c = QmpConnection(table or make_table(), **kw)
    c.start()
    assert one(c.feed(req("qmp_capabilities"))) == {"return": {}}
    return c


def error_of(data: bytes) -> tuple[str, str]:
    m = one(data)
    assert "error" in m and "return" not in m, m
    return m["error"]["class"], m["error"]["desc"]


# =========================================================================== sans-I/O: greeting and negotiation
def test_greeting_shape_and_version_scheme():
    c = QmpConnection(make_table())
    g = one(c.start())
    major, minor, micro = QEMU_COMPAT_VERSION
    assert g == {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                     "package": f"virtio-lm {__version__}"},
                         "capabilities": []}}


def test_greeting_sent_once_and_input_needs_greeting_first():
    c = QmpConnection(make_table())
    with pytest.raises(MonitorError):
        c.receive_data(b"{}")
    c.start()
    with pytest.raises(MonitorError):
        c.start()


# Negotiation is a two-state machine; every (state, input) pair:
#   input -> (answer in state "new", answer in state "negotiated"); answer is
#   ("return", value) or (class, desc); qmp_capabilities moves new -> negotiated.
NEGOTIATION_TABLE = {
    "qmp_capabilities": (("return", {}), ("CommandNotFound", ALREADY_NEGOTIATED_DESC)),
    "query-version": (("CommandNotFound", NEGOTIATION_DESC),
                      ("return", {"qemu": {"major": QEMU_COMPAT_VERSION[0], "minor": QEMU_COMPAT_VERSION[1],
                                           "micro": QEMU_COMPAT_VERSION[2]},
                                  "package": f"virtio-lm {__version__}"})),
    "noargs": (("CommandNotFound", NEGOTIATION_DESC), ("return", {})),
    "no-such-command": (("CommandNotFound", NEGOTIATION_DESC),
                        ("CommandNotFound", "The command no-such-command has not been found")),
}


@pytest.mark.parametrize("state", ["new", "negotiated"])
@pytest.mark.parametrize("command", sorted(NEGOTIATION_TABLE))
def test_negotiation_every_state_and_input(state, command):
    if state == "new":
        c = QmpConnection(make_table())
        c.start()
        expected = NEGOTIATION_TABLE[command][0]
    else:
        c = negotiated()
        expected = NEGOTIATION_TABLE[command][1]
    m = one(c.feed(req(command, id="x")))
    assert m["id"] == "x"
    if expected[0] == "return":
        assert m["return"] == expected[1]
    else:
        assert m["error"] == {"class": expected[0], "desc": expected[1]}
    # the state after: negotiated iff it was, or qmp_capabilities succeeded
    assert c.negotiated == (state == "negotiated" or command == "qmp_capabilities")


def test_negotiation_refuses_oob_and_unknown_capability():
    c = QmpConnection(make_table())
    c.start()
    assert error_of(c.feed(req("qmp_capabilities", {"enable": ["oob"]}))) == \
        ("GenericError", "Capability oob not available")
    assert error_of(c.feed(req("qmp_capabilities", {"enable": ["magic"]}))) == \
        ("GenericError", "Parameter 'enable[0]' does not accept value 'magic'")
    assert not c.negotiated
    assert one(c.feed(req("qmp_capabilities", {"enable": []}))) == {"return": {}}


def test_exec_oob_is_refused_because_not_advertised():
    c = negotiated()
    assert error_of(c.feed(b'{"exec-oob": "noargs", "id": 1}'))[1] == "QMP input member 'exec-oob' is unexpected"


def test_query_commands_lists_builtins_and_registered():
    c = negotiated()
    names = [e["name"] for e in one(c.feed(req("query-commands")))["return"]]
    assert {"qmp_capabilities", "query-version", "query-commands", "echo", "noargs"} <= set(names)
    assert "no-such-command" not in names


# =========================================================================== sans-I/O: ids, framing
@pytest.mark.parametrize("id_", ["abc", 7, None, [1, "x"], {"k": [True]}, 1.5])
def test_id_is_echoed_on_return_and_on_error(id_):
    c = negotiated()
    assert one(c.feed(req("noargs", id=id_))) == {"return": {}, "id": id_}
    m = one(c.feed(req("not-found", id=id_)))
    assert m["id"] == id_ and m["error"]["class"] == "DeviceNotFound"
    m = one(c.feed(json.dumps({"execute": 5, "id": id_}).encode()))
    assert m["id"] == id_


def test_no_id_means_no_id_member():
    c = negotiated()
    assert "id" not in one(c.feed(req("noargs")))
    assert "id" not in one(c.feed(req("not-found")))


def test_several_objects_per_chunk_with_and_without_newlines():
    c = negotiated()
    out = msgs(c.feed(req("noargs", id=1) + req("noargs", id=2) + b"\n \r\n\t" + req("noargs", id=3) + b"\n"))
    assert [m["id"] for m in out] == [1, 2, 3]


def test_object_split_across_chunks_byte_by_byte():
    c = negotiated()
    data = req("echo", {"s": 'a "quoted" \\ back}slash{ [', "list": [1, 2]}, id="split")
    out = b""
    for k in range(len(data)):
        out += c.feed(data[k:k + 1])
        if k < len(data) - 1:
            assert out == b""  # nothing answered before the object is complete
    assert one(out) == {"return": {"s": 'a "quoted" \\ back}slash{ [', "list": [1, 2]}, "id": "split"}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=400), max_size=8), st.booleans())
def test_any_split_gives_the_same_answers(cuts, newline):
    sep = b"\n" if newline else b""
    stream = sep.join([
        req("echo", {"s": "x\\y\"{}", "i": -3}, id="a"),
        b"[1, 2]",
        req("noargs", id={"n": "}"}),
        b"garbage",
        b' "str" ',
        req("echo", {"s": "\u00e9"}, id=5),
    ]) + b"\n"
    whole = negotiated().feed(stream)
    c = negotiated()
    points = sorted({min(x, len(stream)) for x in cuts})
    parts, prev = [], 0
    for p in points + [len(stream)]:
        parts.append(stream[prev:p])
        prev = p
    assert b"".join(c.feed(p) for p in parts) == whole
    assert len(msgs(whole)) == 6


# =========================================================================== sans-I/O: malformed input, one test each
def _garbage_then_alive(data: bytes) -> tuple[str, str, dict]:
    c = negotiated()
    out = msgs(c.feed(data + b"\n" + req("noargs", id="after")))
    assert len(out) == 2, out
    assert out[1] == {"return": {}, "id": "after"}  # the stream goes on
    assert "id" not in out[0] or out[0]["id"] is not None
    return out[0]["error"]["class"], out[0]["error"]["desc"], out[0]


def test_garbage_non_object_array():
    assert _garbage_then_alive(b"[1, 2]")[:2] == ("GenericError", "QMP input must be a JSON object")


def test_garbage_non_object_number():
    assert _garbage_then_alive(b"42 ")[:2] == ("GenericError", "QMP input must be a JSON object")


def test_garbage_non_object_string():
    assert _garbage_then_alive(b'"execute"')[:2] == ("GenericError", "QMP input must be a JSON object")


def test_garbage_bare_token():
    assert _garbage_then_alive(b"foo")[:2] == ("GenericError", "JSON parse error, invalid token 'foo'")


def test_garbage_stray_closing_brace():
    assert _garbage_then_alive(b"}")[:2] == ("GenericError", "JSON parse error, stray '}'")


def test_garbage_bad_object_body():
    cls, desc, m = _garbage_then_alive(b'{"execute": noargs}')
    assert cls == "GenericError" and desc.startswith("JSON parse error, ") and "id" not in m


def test_garbage_invalid_utf8():
    assert _garbage_then_alive(b'{"execute": "\xff\xfe"}')[:2] == \
        ("GenericError", "JSON parse error, invalid UTF-8 sequence")


def test_garbage_duplicate_key():
    assert _garbage_then_alive(b'{"execute": "noargs", "execute": "noargs"}')[:2] == \
        ("GenericError", "JSON parse error, duplicate key 'execute'")


def test_garbage_nan_is_not_json():
    assert _garbage_then_alive(b'{"execute": "echo", "arguments": {"s": "a", "n": NaN}}')[:2] == \
        ("GenericError", "JSON parse error, invalid keyword 'NaN'")


def test_garbage_integer_with_too_many_digits():
    cls, desc, _ = _garbage_then_alive(b'{"execute": "echo", "arguments": {"i": ' + b"9" * 5000 + b"}}")
    assert cls == "GenericError" and desc.startswith("JSON parse error, ")


def test_garbage_missing_execute():
    assert _garbage_then_alive(b'{"arguments": {}, "id": 3}')[:2] == \
        ("GenericError", "QMP input lacks member 'execute'")


def test_garbage_execute_not_a_string():
    assert _garbage_then_alive(b'{"execute": ["noargs"]}')[:2] == \
        ("GenericError", "QMP input member 'execute' must be a string")


def test_garbage_arguments_not_an_object():
    assert _garbage_then_alive(b'{"execute": "noargs", "arguments": [1]}')[:2] == \
        ("GenericError", "QMP input member 'arguments' must be an object")


def test_garbage_unexpected_member():
    assert _garbage_then_alive(b'{"execute": "noargs", "argument": {}}')[:2] == \
        ("GenericError", "QMP input member 'argument' is unexpected")


def test_garbage_before_negotiation_still_checked_first():
    c = QmpConnection(make_table())
    c.start()
    assert error_of(c.feed(b"[]")) == ("GenericError", "QMP input must be a JSON object")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_and_answers_are_well_formed(data):
    c = negotiated(max_message=128, max_depth=8)
    out = msgs(c.feed(data))
    for m in out:
        assert ("return" in m) != ("error" in m)
        if "error" in m:
            assert isinstance(m["error"]["class"], str) and isinstance(m["error"]["desc"], str)
    msgs(c.feed(b"\n"))  # ends a trailing bare token
    if not c.closing and not c.in_message:  # between messages: still serving
        assert one(c.feed(req("noargs", id="z"))) == {"return": {}, "id": "z"}


# =========================================================================== sans-I/O: limits
def test_message_size_limit_disconnects_with_typed_reason():
    c = negotiated(max_message=256)
    c.feed(b'{"execute": "echo", "arguments": {"s": "' + b"a" * 200)
    out = c.feed(b"a" * 100)
    assert error_of(out)[1].startswith("JSON parse error, message size limit exceeded")
    assert c.closing and isinstance(c.close_reason, QmpLimitError)
    assert c.close_reason.limit == "message size" and c.close_reason.maximum == 256
    assert c.feed(req("noargs")) == b""  # nothing more is read
    assert c.buffered_bytes == 0


def test_message_at_the_size_limit_is_accepted():
    c = negotiated(max_message=256)
    head = b'{"execute": "echo", "arguments": {"s": "'
    tail = b'"}}'
    data = head + b"a" * (256 - len(head) - len(tail)) + tail
    assert len(data) == 256
    assert one(c.feed(data))["return"]["s"] == "a" * (256 - len(head) - len(tail))
    assert not c.closing


def test_nesting_depth_limit():
    c = negotiated(max_depth=8)
    ok = b'{"execute": "echo", "arguments": {"s": "x", "any": ' + b"[" * 6 + b"]" * 6 + b"}}"
    assert one(c.feed(ok))["return"]["any"] == [[[[[[]]]]]]  # depth 2 + 6 = 8: accepted
    out = c.feed(b'{"execute": "echo", "arguments": {"s": "x", "any": ' + b"[" * 7)
    assert error_of(out)[1] == "JSON parse error, nesting depth limit exceeded: 9 > 8"
    assert c.closing and c.close_reason.limit == "nesting depth"


def test_many_small_messages_in_one_big_chunk_keep_the_buffer_small():
    c = negotiated()
    n = 5000
    out = msgs(c.feed(b"".join(req("noargs", id=i) for i in range(n))))
    assert [m["id"] for m in out] == list(range(n))
    assert c.buffered_bytes == 0 and len(c._buf) < 70000


# =========================================================================== arguments
def _echo(args: dict) -> dict:
    c = negotiated()
    return one(c.feed(req("echo", args, id=1)))


def test_arguments_valid_and_optional_absent_not_passed():
    full = {"s": "x", "i": -(1 << 63), "u": (1 << 64) - 1, "z": 0, "n": 1.5, "b": False, "any": [None],
            "obj": {"k": 1}, "list": [1, 2], "mode": "pull", "nested": {"rate": 3}}
    assert _echo(full)["return"] == full
    assert _echo({"s": ""})["return"] == {"s": ""}


ARG_ERRORS = [
    ({"s": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({}, "Parameter 's' is missing"),
    ({"s": 1}, "Invalid parameter type for 's', expected: string"),
    ({"s": "x", "i": "1"}, "Invalid parameter type for 'i', expected: integer"),
    ({"s": "x", "i": True}, "Invalid parameter type for 'i', expected: integer"),
    ({"s": "x", "i": 1.0}, "Invalid parameter type for 'i', expected: integer"),
    ({"s": "x", "i": 1 << 63}, "Invalid parameter type for 'i', expected: integer"),
    ({"s": "x", "u": -1}, "Parameter 'u' expects uint64"),
    ({"s": "x", "z": 1 << 64}, "Parameter 'z' expects size"),
    ({"s": "x", "n": "1"}, "Invalid parameter type for 'n', expected: number"),
    ({"s": "x", "b": 1}, "Invalid parameter type for 'b', expected: boolean"),
    ({"s": "x", "obj": []}, "Invalid parameter type for 'obj', expected: object"),
    ({"s": "x", "list": {}}, "Invalid parameter type for 'list', expected: array"),
    ({"s": "x", "list": [1, "2"]}, "Invalid parameter type for 'list[1]', expected: integer"),
    ({"s": "x", "mode": "sideways"}, "Parameter 'mode' does not accept value 'sideways'"),
    ({"s": "x", "mode": 1}, "Invalid parameter type for 'mode', expected: string"),
    ({"s": "x", "nested": {}}, "Parameter 'nested.rate' is missing"),
    ({"s": "x", "nested": {"rate": 1, "x": 2}}, "Parameter 'nested.x' is unexpected"),
    ({"s": "x", "nested": {"rate": 1, "name": 2}}, "Invalid parameter type for 'nested.name', expected: string"),
    ({"s": "x", "nested": 5}, "Invalid parameter type for 'nested', expected: object"),
]


@pytest.mark.parametrize("args,desc", ARG_ERRORS, ids=[d for _, d in ARG_ERRORS])
def test_argument_errors_like_qemu(args, desc):
    m = _echo(args)
    assert m == {"error": {"class": "GenericError", "desc": desc}, "id": 1}


def test_command_without_schema_refuses_any_argument():
    c = negotiated()
    assert error_of(c.feed(req("noargs", {"x": 1}))) == ("GenericError", "Parameter 'x' is unexpected")
    assert one(c.feed(req("noargs", {}))) == {"return": {}}


# =========================================================================== handler results
def test_handler_qmp_error_keeps_its_class():
    assert error_of(negotiated().feed(req("not-found"))) == ("DeviceNotFound", "no VF 9")


def test_handler_virtio_lm_error_is_generic_error_with_message():
    cls, desc = error_of(negotiated().feed(req("refused")))
    assert (cls, desc) == ("GenericError", "VF state 'RUNNING' -> 'FREEZED' is not allowed")


def test_handler_bug_is_generic_error_and_monitor_goes_on():
    c = negotiated()
    cls, desc = error_of(c.feed(req("buggy")))
    assert cls == "GenericError" and desc.startswith("internal error in 'buggy': ZeroDivisionError")
    assert one(c.feed(req("noargs"))) == {"return": {}}


def test_handler_result_not_json_is_an_error():
    cls, desc = error_of(negotiated().feed(req("not-json")))
    assert cls == "GenericError" and "result is not JSON" in desc


def test_request_runs_once():
    c = negotiated()
    c.receive_data(req("noargs"))
    r = c.next_request()
    assert r.needs_dispatch
    r.run()
    with pytest.raises(MonitorError):
        r.run()


def test_builtins_and_errors_do_not_need_dispatch():
    c = negotiated()
    c.receive_data(req("query-version") + b"[]" + req("nope") + req("echo", {"s": "x"}))
    flags = [c.next_request().needs_dispatch for _ in range(4)]
    assert flags == [False, False, False, True]


def test_table_call_directly():
    t = make_table()
    assert t.call("echo", {"s": "q"}) == {"s": "q"}
    with pytest.raises(QmpError) as ei:
        t.call("nope")
    assert ei.value.error_class == "CommandNotFound"
    with pytest.raises(QmpError):
        t.call("qmp_capabilities")


def test_qmp_error_refuses_unknown_class():
    with pytest.raises(ValueError):
        QmpError("x", "NoSuchClass")


# =========================================================================== registration
@pytest.mark.parametrize("name,schema", [
    ("echo", None),                      # registered twice
    ("qmp_capabilities", None),          # a built-in
    ("bad name", None),
    ("", None),
    ("x", {"a": "float"}),               # unknown type
    ("x", {"a": ["int", "str"]}),        # array with two element types
    ("x", {"a": ()}),                    # empty enum
    ("x", {"a": ("p", "p")}),            # repeated enum value
    ("x", {"a b": "int"}),               # bad member name
    ("x", {"a": "int", "*a": "int"}),    # repeated member
    ("x", {"a": 5}),                     # not a spec
    ("x", ["int"]),                      # schema is not a mapping
])
def test_registration_errors(name, schema):
    t = make_table()
    with pytest.raises(CommandRegistrationError):
        t.register(name, lambda a: None, args_schema=schema)


def test_unregister():
    t = make_table()
    t.unregister("echo")
    assert "echo" not in t
    with pytest.raises(CommandRegistrationError):
        t.unregister("echo")
    with pytest.raises(CommandRegistrationError):
        t.unregister("query-commands")


# =========================================================================== events
def test_events_only_after_negotiation_and_carry_timestamps():
    c = QmpConnection(make_table())
    c.start()
    assert c.event("STOP") == b""
    c.feed(req("qmp_capabilities"))
    ns = 1_700_000_000_123_456_789
    assert one(c.event("STOP", now_ns=ns)) == {
        "event": "STOP", "timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456}}
    m = one(c.event("MIGRATION", {"status": "active"}, now_ns=ns))
    assert m["data"] == {"status": "active"} and m["timestamp"]["microseconds"] == 123_456
    live = one(make_event("RESUME"))["timestamp"]
    assert live["seconds"] > 1_600_000_000 and 0 <= live["microseconds"] < 1_000_000


@pytest.mark.parametrize("name,data", [("stop", None), ("", None), ("A B", None),
                                       ("X", [1]), ("X", {"o": object()})])
def test_bad_events_are_refused(name, data):
    with pytest.raises(MonitorError):
        make_event(name, data)


# =========================================================================== real server, real qemu.qmp client
class Gate:
    """A handler that blocks until released, and says when it started."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, args):
        self.started.set()
        assert self.release.wait(30)
        self.finished.set()
        return {"released": True}


@pytest.fixture
def server(tmp_path):
    t = make_table()
    srv = QmpServer(t, f"unix:{tmp_path}/qmp.sock").start()
    yield srv
    srv.close()


def test_qemu_qmp_client_over_unix_socket(server):
    async def main():
        c = QMPClient("t")
        await c.connect(server.address.sockaddr)
        assert c.greeting.QMP.version["package"] == f"virtio-lm {__version__}"
        assert await c.execute("echo", {"s": "hi", "list": [1]}) == {"s": "hi", "list": [1]}
        assert await c.execute("noargs") == {}
        names = {e["name"] for e in await c.execute("query-commands")}
        assert "echo" in names
        with pytest.raises(ExecuteError) as ei:
            await c.execute("not-found")
        assert ei.value.error_class == "DeviceNotFound" and ei.value.error.error.desc == "no VF 9"
        with pytest.raises(ExecuteError) as ei:
            await c.execute("echo", {"s": "x", "oops": 1})
        assert ei.value.error_class == "GenericError"
        assert ei.value.error.error.desc == "Parameter 'oops' is unexpected"
        with pytest.raises(ExecuteError) as ei:
            await c.execute("qmp_capabilities")
        assert ei.value.error_class == "CommandNotFound"
        await c.disconnect()
    asyncio.run(main())


def test_qemu_qmp_client_over_tcp_port_zero():
    with QmpServer(make_table(), "tcp:127.0.0.1:0") as srv:
        assert srv.address.kind == "tcp" and srv.address.port != 0
        assert str(srv.address) == f"tcp:127.0.0.1:{srv.address.port}"

        async def main():
            c = QMPClient("tcp")
            await c.connect(srv.address.sockaddr)
            v = await c.execute("query-version")
            assert v["qemu"]["major"] == QEMU_COMPAT_VERSION[0]
            assert await c.execute("echo", {"s": "tcp"}) == {"s": "tcp"}
            await c.disconnect()
        asyncio.run(main())


def test_events_reach_every_negotiated_client_via_qemu_qmp_listener(server):
    async def main():
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(server.address.sockaddr)
        await b.connect(server.address.sockaddr)
        with a.listener(["MIGRATION"]) as la, b.listener() as lb:
            # emitted from a foreign thread, as the migration engine will
            th = threading.Thread(target=server.emit_event, args=("MIGRATION", {"status": "setup"}))
            th.start()
            th.join()
            ea = await asyncio.wait_for(la.get(), 30)
            eb = await asyncio.wait_for(lb.get(), 30)
        for e in (ea, eb):
            assert e["event"] == "MIGRATION" and e["data"] == {"status": "setup"}
            assert set(e["timestamp"]) == {"seconds", "microseconds"}
        await a.disconnect()
        await b.disconnect()
    asyncio.run(main())


def test_blocking_handler_does_not_block_io_or_builtins(tmp_path):
    gate = Gate()
    t = make_table()
    t.register("slow", gate)
    with QmpServer(t, f"unix:{tmp_path}/s.sock") as srv:
        async def main():
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(srv.address.sockaddr)
            await b.connect(srv.address.sockaddr)
            slow = asyncio.create_task(a.execute("slow"))
            await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 30)
            # the dispatcher is busy: built-ins are still answered, events still flow
            assert (await b.execute("query-version"))["package"].startswith("virtio-lm")
            with b.listener(["STOP"]) as lb:
                srv.emit_event("STOP")
                assert (await asyncio.wait_for(lb.get(), 30))["event"] == "STOP"
            queued = asyncio.create_task(b.execute("noargs"))  # waits behind "slow"
            await asyncio.sleep(0)
            assert not queued.done()
            gate.release.set()
            assert await slow == {"released": True}
            assert await queued == {}
            await a.disconnect()
            await b.disconnect()
        asyncio.run(main())


def test_event_emitted_by_a_handler_arrives_before_its_answer(tmp_path):
    t = CommandTable()
    holder = {}
    t.register("stop", lambda a: holder["srv"].emit_event("STOP"))
    with QmpServer(t, f"unix:{tmp_path}/e.sock") as srv:
        holder["srv"] = srv
        with RawClient(srv) as rc:
            rc.negotiate()
            rc.send(req("stop", id=1))
            first, second = rc.read_msg(), rc.read_msg()
            assert first["event"] == "STOP" and second == {"return": {}, "id": 1}


# =========================================================================== raw sockets: hostile clients
class RawClient:
    def __init__(self, srv: QmpServer):
        addr = srv.address
        fam = socket.AF_UNIX if addr.kind == "unix" else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(30)  # a safety net against hangs, not an assertion
        self.sock.connect(addr.sockaddr)
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def read_msg(self) -> dict | None:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def negotiate(self):
        assert "QMP" in self.read_msg()
        self.send(req("qmp_capabilities"))
        assert self.read_msg() == {"return": {}}

    def read_to_eof(self) -> bytes:
        data = self.buf
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def qmp_works(srv: QmpServer) -> bool:
    async def main():
        c = QMPClient("probe")
        await c.connect(srv.address.sockaddr)
        r = await c.execute("echo", {"s": "alive"})
        await c.disconnect()
        return r == {"s": "alive"}
    return asyncio.run(main())


def test_client_vanishing_mid_command_leaves_server_serving(tmp_path):
    gate = Gate()
    t = make_table()
    t.register("slow", gate)
    with QmpServer(t, f"unix:{tmp_path}/v.sock") as srv:
        with RawClient(srv) as rc:
            rc.negotiate()
            rc.send(req("slow", id="gone") + req("noargs", id="never"))
            assert gate.started.wait(30)
        # the client is gone while its command runs; the answer has nowhere to go
        gate.release.set()
        assert gate.finished.wait(30)
        assert qmp_works(srv)


def test_client_flooding_garbage_is_disconnected_and_others_are_served(tmp_path):
    with QmpServer(make_table(), f"unix:{tmp_path}/g.sock", max_message=4096, max_output=65536) as srv:
        with RawClient(srv) as good:
            good.negotiate()
            with RawClient(srv) as bad:
                rng = __import__("random").Random(5)
                junk = bytes(rng.getrandbits(8) for _ in range(65536))
                disconnected = False
                for _ in range(1024):  # at most 64 MiB; the server cuts it off long before
                    try:
                        bad.send(junk)
                    except (BrokenPipeError, ConnectionResetError):
                        disconnected = True
                        break
                assert disconnected
            good.send(req("echo", {"s": "still here"}, id=9))
            assert good.read_msg() == {"return": {"s": "still here"}, "id": 9}
        assert qmp_works(srv)


def test_client_flooding_delimited_garbage_gets_answers_until_it_stops_reading(tmp_path):
    with QmpServer(make_table(), f"unix:{tmp_path}/d.sock", max_output=65536) as srv:
        with RawClient(srv) as bad:
            bad.negotiate()
            disconnected = False
            for _ in range(4096):
                try:
                    bad.send(b"[]" * 4096)  # each answered with an error the client never reads
                except (BrokenPipeError, ConnectionResetError):
                    disconnected = True
                    break
            assert disconnected
        assert qmp_works(srv)


def test_client_not_reading_events_is_disconnected(tmp_path):
    with QmpServer(make_table(), f"unix:{tmp_path}/n.sock", max_output=65536) as srv:
        with RawClient(srv) as slow:
            slow.negotiate()
            n = 2000
            for i in range(n):  # ~2 MiB, far above max_output plus socket buffers
                srv.emit_event("MIGRATION_PASS", {"pass": i, "pad": "x" * 1000})
            # not a byte read until the server has let the client go: a client reading
            # beside the broadcast may keep up with it (and is then rightly never cut off)
            deadline = time.monotonic() + 30
            while srv.client_count:
                assert time.monotonic() < deadline, "the client that does not read was never disconnected"
                time.sleep(0.01)
            got = slow.read_to_eof().count(b"MIGRATION_PASS")
            assert 0 < got < n
        assert qmp_works(srv)


def test_unterminated_message_past_the_size_limit_gets_error_then_eof(tmp_path):
    with QmpServer(make_table(), f"unix:{tmp_path}/u.sock", max_message=1024) as srv:
        with RawClient(srv) as rc:
            rc.negotiate()
            rc.send(b'{"execute": "echo", "arguments": {"s": "' + b"a" * 2048)
            m = rc.read_msg()
            assert m["error"]["desc"].startswith("JSON parse error, message size limit exceeded")
            assert rc.read_to_eof() == b""


def test_max_clients(tmp_path):
    with QmpServer(make_table(), f"unix:{tmp_path}/m.sock", max_clients=1) as srv:
        with RawClient(srv) as first:
            assert "QMP" in first.read_msg()
            with RawClient(srv) as second:
                assert second.read_to_eof() == b""  # closed without a greeting
            first.send(req("qmp_capabilities", id=1))
            assert first.read_msg() == {"return": {}, "id": 1}


# =========================================================================== server life cycle
def test_close_ends_clients_removes_socket_and_drops_later_events(tmp_path):
    path = tmp_path / "c.sock"
    srv = QmpServer(make_table(), f"unix:{path}").start()
    assert path.exists()
    rc = RawClient(srv)
    rc.negotiate()
    srv.close()
    assert rc.read_to_eof() == b""
    rc.sock.close()
    assert not path.exists()
    assert srv.wait_closed(0)
    srv.emit_event("STOP")  # no effect, no error
    srv.close()  # idempotent


def test_quit_from_a_handler_answers_then_closes(tmp_path):
    t = CommandTable()
    holder = {}

    def quit_(args):
        holder["srv"].close()

    t.register("quit", quit_)
    srv = QmpServer(t, f"unix:{tmp_path}/q.sock").start()
    holder["srv"] = srv
    with RawClient(srv) as rc:
        rc.negotiate()
        rc.send(req("quit", id="q"))
        assert rc.read_msg() == {"return": {}, "id": "q"}
        assert rc.read_to_eof() == b""
    assert srv.wait_closed(30)


def test_start_refuses_a_path_that_is_not_a_socket(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(MonitorAddressError):
        QmpServer(make_table(), f"unix:{f}").start()
    assert f.read_text() == "keep me"


def test_start_reports_a_port_in_use():
    with QmpServer(make_table(), "tcp:127.0.0.1:0") as srv:
        with pytest.raises(MonitorAddressError):
            QmpServer(make_table(), ("127.0.0.1", srv.address.port)).start()


def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(path))
    s.close()  # leaves the socket file behind, as a crashed host would
    with QmpServer(make_table(), path) as srv:
        assert qmp_works(srv)


def test_client_gone_while_paused_is_not_answered_further(tmp_path, caplog):
    """Issue 12 defect 2: a client sends a command and a pile of buffered input, then
    disconnects.  Reading is paused (read_high_water) so the server does not see the
    EOF; the answer's write fails and the transport starts closing.  The server must
    stop there, not parse and answer everything still buffered into a dead transport
    (asyncio logs "socket.send() raised exception." for every such write)."""
    gate = Gate()
    t = make_table()
    t.register("slow", gate)
    pile = b"[]\n" * 20000  # 20000 delimited errors to answer, far above read_high_water
    with caplog.at_level(logging.WARNING, logger="asyncio"), \
            QmpServer(t, f"unix:{tmp_path}/p.sock", read_high_water=1024) as srv:
        with RawClient(srv) as rc:
            rc.negotiate()
            rc.send(req("slow", id="gone") + pile)
            assert gate.started.wait(30)
        gate.release.set()
        assert gate.finished.wait(30)
        assert qmp_works(srv)  # the answer to 'gone' was tried (and failed) before this
    sends = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert sends == [], f"{len(sends)} writes into a closed transport"


def test_slow_reading_client_is_bounded_and_others_are_unaffected(tmp_path):
    """Issue 12: a client that reads, but slower than events come.  What waits for it is
    bounded: it is disconnected once it is more than max_output behind (plus what the
    kernel's socket buffers hold, plus one batch), not earlier, while a client that keeps
    up gets every event and every answer."""
    max_output = 65536
    with QmpServer(make_table(), f"unix:{tmp_path}/s.sock", max_output=max_output) as srv:
        with RawClient(srv) as good, RawClient(srv) as slow:
            good.negotiate()
            slow.negotiate()
            assert srv.client_count == 2
            kernel = 2 * (slow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                          + slow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            data = {"pass": 0, "pad": "x" * 1000}
            size = len(make_event("MIGRATION_PASS", data))  # +- a few bytes of timestamp digits
            batch_bytes = 32 * size
            sent = read = 0
            for batch in range(400):  # at most ~13 MiB of events; a slow client is cut long before
                behind_before = sent * size - read
                for _ in range(32):
                    srv.emit_event("MIGRATION_PASS", dict(data, **{"pass": sent % 10}))
                    sent += 1
                good.send(req("echo", {"s": "ping"}, id=batch))
                seen = []
                while (m := good.read_msg()) is not None and "return" not in m:
                    seen.append(m["data"]["pass"])
                assert m == {"return": {"s": "ping"}, "id": batch}, m
                assert seen == [i % 10 for i in range(sent - 32, sent)], "the good client lost or reordered events"
                if srv.client_count == 1:
                    break
                read += len(slow.sock.recv(1024))  # 1 KiB per 32 KiB sent: it falls behind
            assert srv.client_count == 1, f"the slow client was never cut off after {sent} events"
            behind = sent * size - read
            assert behind > max_output, f"cut off only {behind} bytes behind"
            assert behind_before <= max_output + kernel + batch_bytes, (behind_before, kernel)
            good.send(req("echo", {"s": "still here"}, id="end"))
            while (m := good.read_msg()) is not None and "return" not in m:
                pass
            assert m == {"return": {"s": "still here"}, "id": "end"}
