"""virtio-net wire formats and Ethernet helpers (wire/net.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import EnumValueError, FieldValueError, ShortBufferError, TrailingDataError, WireError
from virtio_lm.wire import net
from virtio_lm.wire.features import mask, unmet_requirements
from virtio_lm.wire.net import (
    CTRL_COMMANDS,
    CTRL_DECODERS,
    NET_REQUIREMENTS,
    CtrlClass,
    GsoType,
    MacCmd,
    MacTableParser,
    MacTables,
    MqCmd,
    NetConfig,
    NetFeature,
    NetHdrFlags,
    NetHdrV1,
    NetStatus,
    RxCmd,
    VlanCmd,
    announce_frame,
    decode_mac_tables,
    parse_announce,
    parse_eth,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
macs = st.binary(min_size=6, max_size=6)
gso_types = st.builds(lambda g, e: int(g) | (0x80 if e else 0), st.sampled_from(list(GsoType)), st.booleans())
hdrs = st.builds(
    NetHdrV1,
    flags=st.builds(NetHdrFlags, st.integers(0, 7)),
    gso_type=gso_types,
    hdr_len=u16,
    gso_size=u16,
    csum_start=u16,
    csum_offset=u16,
    num_buffers=u16,
)
configs = st.builds(
    NetConfig,
    mac=macs,
    status=st.builds(NetStatus, st.integers(0, 3)),
    max_virtqueue_pairs=st.integers(0, 0x8000),
    mtu=u16,
    speed=u32,
    duplex=u8,
    rss_max_key_size=u8,
    rss_max_indirection_table_length=u16,
    supported_hash_types=u32,
)
tables = st.builds(
    MacTables,
    unicast=st.lists(macs, max_size=5).map(tuple),
    multicast=st.lists(macs, max_size=5).map(tuple),
)


# ------------------------------------------------------------------ header
@settings(max_examples=200, deadline=None)
@given(hdrs)
def test_hdr_round_trip(h: NetHdrV1) -> None:
    raw = h.encode()
    assert len(raw) == net.NET_HDR_SIZE == 12
    assert NetHdrV1.decode(raw) == h
    assert raw[10:12] == h.num_buffers.to_bytes(2, "little")


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 7), gso=gso_types, rest=st.binary(min_size=10, max_size=10))
def test_hdr_bytes_round_trip(flags: int, gso: int, rest: bytes) -> None:
    raw = bytes((flags, gso)) + rest
    assert NetHdrV1.decode(raw).encode() == raw


def test_hdr_gso_and_ecn_split() -> None:
    h = NetHdrV1(gso_type=GsoType.TCPV6 | net.GSO_ECN)
    assert h.gso is GsoType.TCPV6 and h.ecn
    assert NetHdrV1().gso is GsoType.NONE and not NetHdrV1().ecn


def test_hdr_short_buffer() -> None:
    with pytest.raises(ShortBufferError) as ei:
        NetHdrV1.decode(bytes(10))  # the legacy header without num_buffers
    assert ei.value.layout == "NetHdrV1" and ei.value.needed == 12


def test_hdr_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError):
        NetHdrV1.decode(bytes(13))


@pytest.mark.parametrize("gso", [2, 6, 0x7F, 0x82, 0xFF, 0x40])
def test_hdr_unknown_gso_type(gso: int) -> None:
    with pytest.raises(EnumValueError) as ei:
        NetHdrV1.decode(bytes((0, gso)) + bytes(10))
    assert ei.value.field == "gso_type" and ei.value.value == gso


def test_hdr_reserved_flag_bits() -> None:
    with pytest.raises(FieldValueError) as ei:
        NetHdrV1.decode(bytes((8, 0)) + bytes(10))
    assert ei.value.field == "flags"


# ------------------------------------------------------------------ config
@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@settings(max_examples=200, deadline=None)
@given(configs)
def test_config_round_trip(c: NetConfig) -> None:
    raw = c.encode()
    assert len(raw) == net.NET_CONFIG_SIZE == 24
    assert NetConfig.decode(raw) == c
    assert raw[:6] == c.mac and raw[6:8] == int(c.status).to_bytes(2, "little")


@settings(max_examples=100, deadline=None)
@given(configs)
def test_config_bytes_round_trip(c: NetConfig) -> None:
    raw = c.encode()
    assert NetConfig.decode(raw).encode() == raw


def test_config_short_buffer() -> None:
    with pytest.raises(ShortBufferError):
        NetConfig.decode(bytes(23))


def test_config_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError):
        NetConfig.decode(bytes(25))


def test_config_reserved_status_bits() -> None:
    raw = bytearray(NetConfig().encode())
    raw[6] = 4
    with pytest.raises(FieldValueError) as ei:
        NetConfig.decode(bytes(raw))
    assert ei.value.field == "status"


def test_config_too_many_queue_pairs() -> None:
    raw = bytearray(NetConfig().encode())
    raw[8:10] = (0x8001).to_bytes(2, "little")
    with pytest.raises(FieldValueError) as ei:
        NetConfig.decode(bytes(raw))
    assert ei.value.field == "max_virtqueue_pairs"


def test_config_mac_must_be_six_bytes() -> None:
    with pytest.raises(FieldValueError) as ei:
        NetConfig(mac=b"\x01\x02").encode()
    assert ei.value.field == "mac"


# ------------------------------------------------------------------ features
def test_feature_dependencies() -> None:
    f = NetFeature
    assert unmet_requirements(mask(f.CTRL_RX), NET_REQUIREMENTS, device_bits=f) == ["CTRL_RX requires CTRL_VQ"]
    assert unmet_requirements(mask(f.CTRL_RX_EXTRA, f.CTRL_VQ), NET_REQUIREMENTS, device_bits=f) == [
        "CTRL_RX_EXTRA requires CTRL_RX"
    ]
    assert unmet_requirements(mask(f.GUEST_ECN, f.GUEST_CSUM, f.GUEST_TSO6), NET_REQUIREMENTS) == []
    assert unmet_requirements(mask(f.GUEST_ECN), NET_REQUIREMENTS, device_bits=f) == [
        "GUEST_ECN requires GUEST_TSO4 or GUEST_TSO6"
    ]
    ok = mask(f.MAC, f.STATUS, f.CTRL_VQ, f.CTRL_RX, f.CTRL_VLAN, f.GUEST_ANNOUNCE, f.MQ, f.CTRL_MAC_ADDR)
    assert unmet_requirements(ok, NET_REQUIREMENTS) == []


# ------------------------------------------------------------------ control commands
def test_every_implemented_command_has_a_decoder() -> None:
    implemented = {(c, cmd) for (c, cmd) in CTRL_DECODERS}
    assert {(CtrlClass.RX, c) for c in RxCmd} <= implemented
    assert (CtrlClass.MQ, MqCmd.RSS_CONFIG) not in implemented
    assert (CtrlClass.MQ, MqCmd.HASH_CONFIG) not in implemented
    for cls, cmd in implemented:
        assert cmd in CTRL_COMMANDS[CtrlClass(cls)].__members__.values()


@pytest.mark.parametrize("value,expected", [(b"\x00", False), (b"\x01", True)])
def test_rx_onoff(value: bytes, expected: bool) -> None:
    assert net.decode_rx_onoff(value) is expected
    assert net.encode_rx_onoff(expected) == value


@pytest.mark.parametrize("bad", [2, 0x80, 0xFF])
def test_rx_onoff_out_of_range(bad: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        net.decode_rx_onoff(bytes((bad,)))
    assert ei.value.field == "on"


def test_rx_onoff_short() -> None:
    with pytest.raises(ShortBufferError) as ei:
        net.decode_rx_onoff(b"")
    assert ei.value.field == "on"


def test_rx_onoff_trailing() -> None:
    with pytest.raises(TrailingDataError):
        net.decode_rx_onoff(b"\x01\x00")


def test_mac_addr_set() -> None:
    assert net.decode_mac_addr(b"\x52\x54\x00\x12\x34\x56") == b"\x52\x54\x00\x12\x34\x56"


def test_mac_addr_short() -> None:
    with pytest.raises(ShortBufferError) as ei:
        net.decode_mac_addr(bytes(5))
    assert ei.value.field == "mac"


def test_mac_addr_trailing() -> None:
    with pytest.raises(TrailingDataError):
        net.decode_mac_addr(bytes(7))


@settings(max_examples=100, deadline=None)
@given(vid=st.integers(0, 4095))
def test_vlan_round_trip(vid: int) -> None:
    assert net.decode_vlan_id(net.encode_vlan_id(vid)) == vid


@pytest.mark.parametrize("vid", [4096, 0x8000, 0xFFFF])
def test_vlan_out_of_range(vid: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        net.decode_vlan_id(vid.to_bytes(2, "little"))
    assert ei.value.field == "vid"
    with pytest.raises(FieldValueError):
        net.encode_vlan_id(vid)


def test_vlan_short() -> None:
    with pytest.raises(ShortBufferError) as ei:
        net.decode_vlan_id(b"\x01")
    assert ei.value.field == "vid"


def test_vlan_trailing() -> None:
    with pytest.raises(TrailingDataError):
        net.decode_vlan_id(b"\x01\x00\x00")


def test_announce_ack_takes_no_data() -> None:
    assert net.decode_announce_ack(b"") is None
    with pytest.raises(TrailingDataError):
        net.decode_announce_ack(b"\x00")


@pytest.mark.parametrize("pairs", [1, 2, 0x7FFF, 0x8000])
def test_mq_pairs_round_trip(pairs: int) -> None:
    assert net.decode_mq_pairs(net.encode_mq_pairs(pairs)) == pairs


@pytest.mark.parametrize("pairs", [0, 0x8001, 0xFFFF])
def test_mq_pairs_out_of_range(pairs: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        net.decode_mq_pairs(pairs.to_bytes(2, "little"))
    assert ei.value.field == "virtqueue_pairs"


def test_mq_pairs_short() -> None:
    with pytest.raises(ShortBufferError):
        net.decode_mq_pairs(b"\x01")


def test_mq_pairs_trailing() -> None:
    with pytest.raises(TrailingDataError):
        net.decode_mq_pairs(b"\x01\x00\x00")


def test_encode_ctrl() -> None:
    assert net.encode_ctrl(CtrlClass.VLAN, VlanCmd.DEL, net.encode_vlan_id(5)) == b"\x02\x01\x05\x00"
    with pytest.raises(FieldValueError) as ei:
        net.encode_ctrl(256, 0)
    assert ei.value.field == "class"


# ------------------------------------------------------------------ MAC TABLE_SET
def _feed_bytewise(data: bytes) -> MacTables:
    p = MacTableParser(len(data))
    for i in range(len(data)):
        p.feed(data[i : i + 1])
    return p.finish()


def _feed_all(data: bytes) -> MacTables:
    return decode_mac_tables(data)


FEEDERS = [pytest.param(_feed_all, id="all-at-once"), pytest.param(_feed_bytewise, id="byte-by-byte")]


@settings(max_examples=100, deadline=None)
@given(t=tables)
def test_mac_tables_round_trip(t: MacTables) -> None:
    raw = t.encode()
    assert len(raw) == 8 + 6 * (len(t.unicast) + len(t.multicast))
    assert decode_mac_tables(raw) == t
    assert _feed_bytewise(raw) == t
    assert decode_mac_tables(raw).encode() == raw


@settings(max_examples=100, deadline=None)
@given(t=tables, cuts=st.lists(st.integers(0, 100), max_size=6))
def test_mac_tables_any_chunking(t: MacTables, cuts: list[int]) -> None:
    raw = t.encode()
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    p = MacTableParser(len(raw))
    for a, b in zip(points, points[1:]):
        p.feed(raw[a:b])
    assert p.finish() == t


def test_mac_tables_known_bytes() -> None:
    a, b, c = b"\x02" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\x33\x33\x00\x00\x00\x01"
    raw = (1).to_bytes(4, "little") + a + (2).to_bytes(4, "little") + b + c
    assert decode_mac_tables(raw) == MacTables((a,), (b, c))


def _tables_bytes(uni: list[bytes], multi: list[bytes]) -> bytes:
    return MacTables(tuple(uni), tuple(multi)).encode()


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_short_unicast_count(feed) -> None:
    with pytest.raises(ShortBufferError) as ei:
        feed(b"\x00\x00")
    assert ei.value.field == "unicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_short_multicast_count(feed) -> None:
    with pytest.raises(ShortBufferError) as ei:
        feed(_tables_bytes([b"\x02" * 6], [])[:-2])
    assert ei.value.field == "multicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_missing_multicast_table(feed) -> None:
    with pytest.raises(ShortBufferError) as ei:
        feed(_tables_bytes([b"\x02" * 6], [])[:-4])
    assert ei.value.field == "multicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_empty(feed) -> None:
    with pytest.raises(ShortBufferError) as ei:
        feed(b"")
    assert ei.value.field == "unicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_unicast_entries_overflow(feed) -> None:
    # claims 2 unicast addresses, carries 1 and the multicast count
    raw = (2).to_bytes(4, "little") + b"\x02" * 6 + (0).to_bytes(4, "little")
    with pytest.raises(FieldValueError) as ei:
        feed(raw)
    assert ei.value.field == "unicast.entries" and ei.value.value == 2


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_huge_entries(feed) -> None:
    raw = (0xFFFF_FFFF).to_bytes(4, "little") + bytes(8)
    with pytest.raises(FieldValueError) as ei:
        feed(raw)
    assert ei.value.field == "unicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_multicast_entries_overflow(feed) -> None:
    raw = _tables_bytes([], [b"\x01" * 6])
    raw = raw[:4] + (2).to_bytes(4, "little") + raw[8:]
    with pytest.raises(FieldValueError) as ei:
        feed(raw)
    assert ei.value.field == "multicast.entries"


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_trailing(feed) -> None:
    with pytest.raises(TrailingDataError):
        feed(_tables_bytes([b"\x02" * 6], [b"\x01" * 6]) + b"\x00")


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_trailing_after_empty_tables(feed) -> None:
    with pytest.raises(TrailingDataError):
        feed(bytes(8) + bytes(6))


@pytest.mark.parametrize("feed", FEEDERS)
def test_mac_tables_unicast_fits_without_multicast_count(feed) -> None:
    """A full unicast table that leaves no room for the multicast count is short, not overflow."""
    raw = (1).to_bytes(4, "little") + b"\x02" * 6
    with pytest.raises(WireError) as ei:
        feed(raw)
    assert isinstance(ei.value, ShortBufferError) and ei.value.field == "multicast.entries"


def test_mac_table_parser_feed_beyond_total() -> None:
    p = MacTableParser(8)
    with pytest.raises(FieldValueError):
        p.feed(bytes(9))


def test_mac_table_parser_stays_refused() -> None:
    p = MacTableParser(9)
    with pytest.raises(FieldValueError):
        p.feed((5).to_bytes(4, "little"))
    with pytest.raises(FieldValueError):
        p.feed(b"\x00")
    with pytest.raises(FieldValueError):
        p.finish()


def test_mac_table_parser_done_flag() -> None:
    raw = _tables_bytes([], [])
    p = MacTableParser(len(raw))
    p.feed(raw[:4])
    assert not p.done
    p.feed(raw[4:])
    assert p.done and p.finish() == MacTables((), ())


def test_mac_tables_encode_refuses_bad_address() -> None:
    with pytest.raises(FieldValueError) as ei:
        MacTables((b"\x01",), ()).encode()
    assert ei.value.field == "unicast.macs"


def test_mac_table_decoder_in_dispatch() -> None:
    assert CTRL_DECODERS[(CtrlClass.MAC, MacCmd.TABLE_SET)](bytes(8)) == MacTables((), ())


# ------------------------------------------------------------------ Ethernet
def test_mac_text() -> None:
    assert net.parse_mac("52:54:00:12:34:ab") == bytes.fromhex("5254001234ab")
    assert net.format_mac(bytes.fromhex("5254001234ab")) == "52:54:00:12:34:ab"
    for bad in ("52:54:00:12:34", "52:54:00:12:34:zz", "5254.0012.34ab", "52:54:00:12:34:5"):
        with pytest.raises(FieldValueError):
            net.parse_mac(bad)


def test_multicast_bit() -> None:
    assert net.is_multicast(net.BROADCAST_MAC)
    assert net.is_multicast(b"\x01\x00\x5e\x00\x00\x01")
    assert not net.is_multicast(b"\x52\x54\x00\x00\x00\x01")


@settings(max_examples=100, deadline=None)
@given(dst=macs, src=macs, ethertype=u16, payload=st.binary(max_size=64))
def test_eth_round_trip(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> None:
    frame = net.EthFrame(dst, src, ethertype, payload)
    raw = frame.encode()
    assert raw[12:14] == ethertype.to_bytes(2, "big")  # network byte order
    assert parse_eth(raw) == frame


def test_eth_short() -> None:
    with pytest.raises(ShortBufferError):
        parse_eth(bytes(13))


def test_eth_header_refuses_bad_mac() -> None:
    with pytest.raises(FieldValueError) as ei:
        net.eth_header(bytes(5), bytes(6), 0x0800)
    assert ei.value.field == "dst"


def test_announce_frame_layout() -> None:
    mac = bytes.fromhex("525400abcdef")
    f = announce_frame(mac)
    assert len(f) == 60
    assert f[0:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x80\x35"
    assert f[14:16] == b"\x00\x01"  # hardware type Ethernet
    assert f[16:18] == b"\x08\x00"  # protocol IPv4
    assert f[18] == 6 and f[19] == 4
    assert f[20:22] == b"\x00\x03"  # reverse request
    assert f[22:28] == mac and f[28:32] == bytes(4)
    assert f[32:38] == mac and f[38:42] == bytes(4)
    assert f[42:] == bytes(18)
    assert parse_announce(f) == mac


def test_parse_announce_negative() -> None:
    mac = bytes.fromhex("525400abcdef")
    f = bytearray(announce_frame(mac))
    f[20:22] = b"\x00\x01"  # ARP-style request opcode: not an announce
    assert parse_announce(bytes(f)) is None
    g = bytearray(announce_frame(mac))
    g[12:14] = b"\x08\x06"
    assert parse_announce(bytes(g)) is None
    assert parse_announce(b"\x00" * 10) is None
    h = bytearray(announce_frame(mac))
    h[22] ^= 1  # sender hardware address differs from the source
    assert parse_announce(bytes(h)) is None


def test_announce_refuses_bad_mac() -> None:
    with pytest.raises(FieldValueError):
        announce_frame(bytes(7))
