"""virtio_lm.addr: the one address parser (monitors, migration URIs, the switch)."""

from __future__ import annotations

import pathlib
import socket

import pytest

from virtio_lm.addr import (
    MIGRATION_SCHEMES,
    MONITOR_SCHEMES,
    Address,
    parse_address,
    parse_hostport,
)
from virtio_lm.errors import (
    AddressError,
    AddressHostError,
    AddressPathError,
    AddressPortError,
    AddressSchemeError,
    VirtioLmError,
)
from virtio_lm.migration.transport import listen


@pytest.mark.parametrize("spec, want", [
    ("tcp:127.0.0.1:4444", Address("tcp", host="127.0.0.1", port=4444)),
    ("tcp:[::1]:4444", Address("tcp", host="::1", port=4444)),
    ("tcp:[fe80::1%eth0]:1", Address("tcp", host="fe80::1%eth0", port=1)),
    ("tcp:localhost:0", Address("tcp", host="localhost", port=0)),
    ("tcp:host-a.example.org:65535", Address("tcp", host="host-a.example.org", port=65535)),
    ("tcp::7", Address("tcp", host="", port=7)),
    ("unix:/tmp/x.sock", Address("unix", path="/tmp/x.sock")),
    ("unix:rel:with:colons", Address("unix", path="rel:with:colons")),
    ("file:/tmp/stream", Address("file", path="/tmp/stream")),
    (("localhost", 7), Address("tcp", host="localhost", port=7)),
    (("::1", 7), Address("tcp", host="::1", port=7)),
    (pathlib.Path("/tmp/p.sock"), Address("unix", path="/tmp/p.sock")),
])
def test_parses(spec, want):
    assert parse_address(spec) == want


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:5555", Address("tcp", host="127.0.0.1", port=5555)),
    ("[::1]:5555", Address("tcp", host="::1", port=5555)),
    ("switch.example:1", Address("tcp", host="switch.example", port=1)),
    (":5555", Address("tcp", host="", port=5555)),
])
def test_parses_bare_hostport(text, want):
    assert parse_hostport(text) == want


def test_empty_host_means_any_to_listen_and_loopback_to_connect():
    a = parse_address("tcp::4444")
    assert (a.host_or_any, a.host_or_loopback, a.sockaddr) == ("0.0.0.0", "127.0.0.1", ("127.0.0.1", 4444))
    b = parse_address("tcp:10.0.0.1:4444")
    assert (b.host_or_any, b.host_or_loopback) == ("10.0.0.1", "10.0.0.1")
    assert parse_address("unix:/s").sockaddr == "/s"


@pytest.mark.parametrize("spec", [
    "tcp:127.0.0.1:4444", "tcp:[::1]:4444", "tcp::0", "unix:/tmp/x", "file:/tmp/y", "tcp:name:1",
])
def test_str_reads_back(spec):
    a = parse_address(spec)
    assert str(a) == spec
    assert parse_address(str(a)) == a
    if a.kind == "tcp":
        assert parse_hostport(a.hostport) == a


def test_ipv6_formats_with_brackets():
    assert str(Address("tcp", host="::1", port=9)) == "tcp:[::1]:9"
    assert str(Address("tcp", host="10.1.2.3", port=9)) == "tcp:10.1.2.3:9"


@pytest.mark.parametrize("spec, error", [
    # IPv6 without brackets: refused, not guessed (it parsed two ways before)
    ("tcp:::1:4444", AddressHostError),
    ("tcp:fe80::1:80", AddressHostError),
    (("fe80::1]", 1), AddressHostError),
    ("tcp:[::1:4444", AddressHostError),
    ("tcp:[]:4444", AddressHostError),
    ("tcp:[10.0.0.1]:4444", AddressHostError),
    ("tcp:a]b:1", AddressHostError),
    ("tcp:a b:1", AddressHostError),
    ("tcp: a:1", AddressHostError),
    (("h", 1, 2), AddressPortError),
    ((5, 1), AddressHostError),
    # ports
    ("tcp:host", AddressPortError),
    ("tcp:[::1]", AddressPortError),
    ("tcp:[::1]4444", AddressPortError),
    ("tcp:host:", AddressPortError),
    ("tcp:host:port", AddressPortError),
    ("tcp:host:-1", AddressPortError),
    ("tcp:host:+1", AddressPortError),
    ("tcp:host:65536", AddressPortError),
    ("tcp:host:70000", AddressPortError),
    ("tcp:host:0x10", AddressPortError),
    ("tcp:host:1 ", AddressPortError),
    ("tcp:host:\u00b2", AddressPortError),  # str.isdigit() is True for '²'
    (("h", -1), AddressPortError),
    (("h", 65536), AddressPortError),
    (("h", True), AddressPortError),
    (("h", "7"), AddressPortError),
    # paths
    ("unix:", AddressPathError),
    ("file:", AddressPathError),
    # schemes
    ("/tmp/x", AddressSchemeError),
    ("udp:1:2", AddressSchemeError),
    ("exec:cat", AddressSchemeError),
    ("TCP:h:1", AddressSchemeError),
    ("", AddressSchemeError),
    (5, AddressSchemeError),
    (None, AddressSchemeError),
])
def test_refusals_are_typed(spec, error):
    with pytest.raises(error) as info:
        parse_address(spec)
    assert isinstance(info.value, AddressError) and isinstance(info.value, VirtioLmError)
    assert isinstance(info.value, ValueError)  # what the parsers it replaced raised
    assert info.value.spec == spec


@pytest.mark.parametrize("text, error", [
    ("5555", AddressPortError), ("h:", AddressPortError), ("h:99999", AddressPortError),
    ("::1:5555", AddressHostError), ("[::1:5555", AddressHostError), ("tcp:h:1", AddressHostError),
])
def test_bare_hostport_refusals_are_typed(text, error):
    with pytest.raises(error):
        parse_hostport(text)


@pytest.mark.parametrize("spec, schemes", [
    ("file:/x", MONITOR_SCHEMES),
    ("unix:/x", MIGRATION_SCHEMES),
    (pathlib.Path("/x"), MIGRATION_SCHEMES),
    (("h", 1), ("unix",)),
])
def test_a_scheme_the_caller_does_not_take_is_refused(spec, schemes):
    with pytest.raises(AddressSchemeError):
        parse_address(spec, schemes)


def test_a_parsed_address_is_taken_as_it_is():
    a = parse_address("tcp:[::1]:5")
    assert parse_address(a) is a
    with pytest.raises(AddressSchemeError):
        parse_address(parse_address("file:/x"), MONITOR_SCHEMES)


def test_unknown_scheme_list_is_refused():
    with pytest.raises(AddressSchemeError):
        parse_address("tcp:h:1", ("tcp", "udp"))


def test_an_ipv6_migration_uri_listens_on_ipv6():
    """The parsed host goes straight to bind(): [::1] is ::1 (not '[::1]', not refused)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    a = parse_address("tcp:[::1]:0", MIGRATION_SCHEMES)
    try:
        lst = listen(a.host_or_any, a.port)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with lst:
        assert lst.family == socket.AF_INET6 and lst.getsockname()[0] == "::1"


@pytest.mark.parametrize("spec, error, bare, bare_error", [
    ("tcp:::1:4444", AddressHostError, "::1:4444", AddressHostError),
    ("exec:cat", AddressSchemeError, "cat", AddressPortError),
    ("tcp:h:99999", AddressPortError, "h:99999", AddressPortError),
])
def test_every_caller_uses_the_one_parser(spec, error, bare, bare_error):
    """The monitor, the migration transport, the monitor client and the switch options all
    refuse the same way."""
    import click

    from virtio_lm.cli import switch_address
    from virtio_lm.host.qmp import CommandTable, QmpServer
    from virtio_lm.migration.transport import start_incoming, start_outgoing
    from virtio_lm.orchestrate import Monitor

    with pytest.raises(error):
        QmpServer(CommandTable(), spec)
    with pytest.raises(error):
        start_incoming(None, spec)  # type: ignore[arg-type]  # refused before the session is used
    with pytest.raises(error):
        start_outgoing(None, spec)  # type: ignore[arg-type]
    with pytest.raises(error):
        Monitor(spec, connect_timeout=0)  # refused before connecting
    with pytest.raises(click.BadParameter) as info:
        switch_address(bare)
    assert isinstance(info.value.__cause__, bare_error)


def test_the_switch_options_take_ipv4_and_names_only():
    import click

    from virtio_lm.cli import switch_address

    assert switch_address("10.0.0.1:5555") == ("10.0.0.1", 5555)
    assert switch_address("localhost:1") == ("localhost", 1)
    assert switch_address(":5555") == ("127.0.0.1", 5555)  # the switch binds a concrete address
    with pytest.raises(click.BadParameter, match="IPv4"):
        switch_address("[::1]:5555")  # parses, but the switch has no IPv6 socket
