"""WebSocket protocol conformance (RFC 6455, RFC 7692) of the stack that serves `/api/ws`:
Hypercorn with the product's settings, an echo app on it (tests/conformance/echo_app.py), and
the gateway itself. Cases follow the Autobahn|Testsuite categories.

The client is a raw socket with its own small frame codec, so that it can send what a library
refuses to: reserved bits and opcodes, fragmented control frames, invalid UTF-8, bad close codes.
Each case ends OK, NON-STRICT (allowed, but not what the RFC recommends: noted by the test) or
FAILED; the table is printed at the end of the run (tests/conformance/README.md keeps it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import struct
import subprocess
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from config import Config
from tests.conformance.echo_app import ECHO_PATH, running_echo
from tests.helpers import WRITE_PATHS, RunningGateway, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MESSAGE = Config().WS_MAX_MESSAGE_SIZE  # the product's limit, which the echo app shares
READ_TIMEOUT = 2.0  # one frame, or the end of the connection

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: removed by the sender, added back to inflate


# -- the frame codec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0  # the three reserved bits; RSV1 (4) marks a compressed message


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the repeated 4-byte key, as one big integer: fast for megabytes too."""
    if not payload:
        return b""
    size = len(payload)
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame with the shortest length encoding (RFC 6455 5.2)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    return header + key + mask(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def deflate(data: bytes) -> bytes:
    """One compressed message, no context takeover (a fresh compressor per message)."""
    compressor = zlib.compressobj(wbits=-15)
    compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert compressed.endswith(DEFLATE_TAIL)
    return compressed[:-4]


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """One server frame, checked for what RFC 6455 5.1-5.2 requires of a server."""
    first, second = await reader.readexactly(2)
    assert not second & 0x80, "a server must not mask its frames"
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        assert size >= 126, "length not in its shortest form"
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
        assert size >= 65536, "length not in its shortest form"
    opcode = first & 0x0F
    if opcode >= CLOSE:
        assert first & 0x80 and size <= 125, "control frames are whole and at most 125 bytes"
    return Frame(opcode, await reader.readexactly(size), bool(first & 0x80), (first >> 4) & 7)


# -- a raw WebSocket client --------------------------------------------------------------------


@dataclass
class Ending:
    """How the server ended the connection."""

    code: int | None  # its close frame's code; None: no close frame (the TCP just closed)
    reason: bytes = b""
    before: list[Frame] = field(default_factory=list)  # frames read before the end
    after_close: list[Frame] = field(default_factory=list)  # frames after its close frame
    tcp_closed: bool = True  # the server closed the TCP connection after the handshake


class RawWebSocket:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.headers = headers  # of the 101 response, names in lower case
        self._inflater: Any = None
        self.last_compressed = False  # whether the last message read came compressed

    @classmethod
    async def connect(cls, port: int, path: str, extensions: str | None = None) -> RawWebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if extensions:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        status, *header_lines = head.decode("latin-1").split("\r\n")
        assert status.startswith("HTTP/1.1 101"), head
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == expected
        return cls(reader, writer, headers)

    @property
    def deflate(self) -> bool:
        return "permessage-deflate" in self.headers.get("sec-websocket-extensions", "")

    async def send(self, opcode: int, payload: bytes = b"", **options: Any) -> None:
        await self.send_raw(encode_frame(opcode, payload, **options))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = READ_TIMEOUT) -> Frame:
        return await asyncio.wait_for(read_frame(self.reader), timeout)

    async def recv_message(self, timeout: float = READ_TIMEOUT) -> tuple[int, bytes]:
        """The next data message (opcode, payload), fragments joined and inflated; control
        frames before it are not expected."""
        first = await self.recv(timeout)
        assert first.opcode in (TEXT, BINARY), first
        frames = [first]
        while not frames[-1].fin:
            frames.append(await self.recv(timeout))
            assert frames[-1].opcode == CONTINUATION and not frames[-1].rsv, frames[-1]
        payload = b"".join(frame.payload for frame in frames)
        self.last_compressed = bool(first.rsv & 4)
        if self.last_compressed:
            assert self.deflate, "RSV1 without permessage-deflate"
            if self._inflater is None or "server_no_context_takeover" in self.headers.get(
                "sec-websocket-extensions", ""
            ):
                self._inflater = zlib.decompressobj(wbits=-15)
            payload = self._inflater.decompress(payload + DEFLATE_TAIL)
        else:
            assert not first.rsv, first
        if first.opcode == TEXT:
            payload.decode("utf-8")  # a server's text must be valid UTF-8 too
        return first.opcode, payload

    async def recv_json(self, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        opcode, payload = await self.recv_message(timeout)
        assert opcode == TEXT
        return json.loads(payload)

    async def no_frame(self, within: float = 0.3) -> None:
        with pytest.raises(asyncio.TimeoutError):
            frame = await self.recv(within)
            raise AssertionError(f"unexpected frame {frame}")

    async def ending(self, timeout: float = READ_TIMEOUT) -> Ending:
        """Read until the server ends the connection. Its close frame is answered (with the same
        code, as RFC 6455 5.5.1 suggests) and then the TCP close is awaited."""
        ending = Ending(None)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await read_frame(self.reader)
                    if frame.opcode != CLOSE:
                        ending.before.append(frame)
                        continue
                    ending.reason = frame.payload[2:]
                    if frame.payload:
                        (ending.code,) = struct.unpack("!H", frame.payload[:2])
                    with contextlib.suppress(ConnectionError):
                        await self.send(CLOSE, frame.payload[:2])
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            return ending  # the TCP closed, with no close frame
        ending.tcp_closed = False
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            async with asyncio.timeout(timeout):
                while True:
                    ending.after_close.append(await read_frame(self.reader))
        if self.reader.at_eof():
            ending.tcp_closed = True
        return ending

    async def close_handshake(self, code: int = 1000, reason: bytes = b"") -> Ending:
        await self.send(CLOSE, close_payload(code, reason))
        return await self.ending()

    def abort(self) -> None:
        self.writer.transport.abort()


# -- verdicts ----------------------------------------------------------------------------------

OK, NON_STRICT, FAILED, SKIPPED = "OK", "NON-STRICT", "FAILED", "SKIPPED"
# Test name prefix -> the Autobahn category it belongs to.
GROUPS = [
    ("test_framing", "1 framing"),
    ("test_ping", "2 ping/pong"),
    ("test_reserved_bits", "3 reserved bits"),
    ("test_reserved_opcode", "4 opcodes"),
    ("test_fragment", "5 fragmentation"),
    ("test_utf8", "6 UTF-8"),
    ("test_close", "7 close"),
    ("test_limits", "9 limits"),
    ("test_deflate", "12/13 permessage-deflate"),
    ("test_gateway", "/api/ws"),
    ("test_autobahn", "Autobahn|Testsuite"),
]


def group_of(nodeid: str) -> str:
    name = nodeid.rsplit("::", 1)[-1]
    return next((group for prefix, group in GROUPS if name.startswith(prefix)), "other")


class ConformanceSummary:
    """A pytest plugin for this module's run: each case's verdict, and the table at the end."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}  # nodeid -> why the case is NON-STRICT
        self.verdicts: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if Path(__file__).name not in report.nodeid:
            return
        if report.failed:
            self.verdicts[report.nodeid] = FAILED
        elif hasattr(report, "wasxfail"):
            self.verdicts[report.nodeid] = FAILED  # a known failure, kept visible
            self.notes[report.nodeid] = f"known: {report.wasxfail}"
        elif report.skipped:
            self.verdicts.setdefault(report.nodeid, SKIPPED)
        elif report.when == "call":
            self.verdicts[report.nodeid] = NON_STRICT if report.nodeid in self.notes else OK

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.verdicts:
            return
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for nodeid, verdict in self.verdicts.items():
            counts[group_of(nodeid)][verdict] += 1
        write = terminalreporter.write_line
        terminalreporter.section("WebSocket conformance")
        write(f"{'group':<28}{OK:>6}{NON_STRICT:>12}{FAILED:>8}{SKIPPED:>9}")
        for _, group in GROUPS:
            if group in counts:
                row = counts[group]
                write(
                    f"{group:<28}{row[OK]:>6}{row[NON_STRICT]:>12}{row[FAILED]:>8}{row[SKIPPED]:>9}"
                )
        # One line per distinct reason, with how many cases it covers.
        reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
        for nodeid, verdict in self.verdicts.items():
            if verdict in (NON_STRICT, FAILED):
                reasons[verdict, self.notes.get(nodeid, "")].append(nodeid.rsplit("::", 1)[-1])
        for (verdict, note), names in reasons.items():
            write(f"{verdict} x{len(names)}: {note or 'see the failure above'} (e.g. {names[0]})")


@pytest.fixture(scope="module", autouse=True)
def conformance_summary(request: pytest.FixtureRequest) -> ConformanceSummary:
    plugin = request.config.pluginmanager.get_plugin("conformance-summary")
    if plugin is None:
        plugin = ConformanceSummary()
        request.config.pluginmanager.register(plugin, "conformance-summary")
    return plugin


class Verdict:
    def __init__(self, summary: ConformanceSummary, nodeid: str) -> None:
        self._summary = summary
        self._nodeid = nodeid

    def non_strict(self, why: str) -> None:
        """The case passes, but not as the RFC recommends."""
        self._summary.notes[self._nodeid] = why

    def failed_connection(self, ending: Ending, code: int) -> None:
        """_Fail the WebSocket Connection_ (RFC 6455 7.1.7): the TCP must end, and the server
        SHOULD first send a close frame with `code`."""
        assert ending.tcp_closed, "the connection was not failed"
        assert not ending.after_close, ending.after_close
        if ending.code is None:
            self.non_strict(f"TCP closed without a close frame (RFC: SHOULD send {code})")
        else:
            assert ending.code == code, ending


@pytest.fixture
def verdict(conformance_summary: ConformanceSummary, request: pytest.FixtureRequest) -> Verdict:
    return Verdict(conformance_summary, request.node.nodeid)


# -- servers -----------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo_port() -> AsyncIterator[int]:
    async with running_echo() as port:
        yield port


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=WRITE_PATHS)
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[RunningGateway]:
    async with running_gateway(WS_FAST_PATH=request.param) as running:
        yield running


@asynccontextmanager
async def connected(
    port: int, path: str = ECHO_PATH, extensions: str | None = None
) -> AsyncIterator[RawWebSocket]:
    ws = await RawWebSocket.connect(port, path, extensions)
    try:
        yield ws
    finally:
        ws.abort()


@pytest_asyncio.fixture(loop_scope="module")
async def echo(echo_port: int) -> AsyncIterator[RawWebSocket]:
    async with connected(echo_port) as ws:
        yield ws


async def assert_echoed(ws: RawWebSocket, opcode: int, payload: bytes) -> None:
    assert await ws.recv_message() == (opcode, payload)


# -- 1 framing ---------------------------------------------------------------------------------

SIZES = [0, 1, 125, 126, 127, 65535, 65536]


@pytest.mark.parametrize("size", SIZES)
async def test_framing_text_message_of_each_length_encoding_is_echoed(echo, size):
    payload = b"*" * size
    await echo.send(TEXT, payload)
    await assert_echoed(echo, TEXT, payload)


@pytest.mark.parametrize("size", SIZES)
async def test_framing_binary_message_of_each_length_encoding_is_echoed(echo, size):
    # Size 0: Quart 0.22 hands the app None for it; the echo app must send b"" back.
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    await echo.send(BINARY, payload)
    await assert_echoed(echo, BINARY, payload)


async def test_framing_frame_written_in_small_chops_is_echoed(echo):
    payload = os.urandom(65536)
    frame = encode_frame(BINARY, payload)
    for start in range(0, len(frame), 997):  # 66 writes
        await echo.send_raw(frame[start : start + 997])
    await assert_echoed(echo, BINARY, payload)


async def test_framing_unmasked_client_frame_fails_the_connection(echo, verdict):
    await echo.send_raw(bytes((0x81, 5)) + b"hello")  # RFC 6455 5.1: a server MUST close
    verdict.failed_connection(await echo.ending(), 1002)


async def test_framing_length_not_in_shortest_form_fails_the_connection(echo, verdict):
    key = os.urandom(4)
    await echo.send_raw(struct.pack("!BBH", 0x81, 0x80 | 126, 5) + key + mask(b"hello", key))
    verdict.failed_connection(await echo.ending(), 1002)


# -- 2 ping/pong -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"Hello, world!", bytes(range(256))[:125], b"\x00\xff\xfe\xfd"],
    ids=["empty", "text", "125", "binary"],
)
async def test_ping_is_answered_with_pong_of_same_payload(echo, payload):
    await echo.send(PING, payload)
    assert await echo.recv() == Frame(PONG, payload)


async def test_ping_sent_in_one_byte_chops_is_answered(echo):
    frame = encode_frame(PING, b"x" * 125)
    for index in range(len(frame)):
        await echo.send_raw(frame[index : index + 1])
    assert await echo.recv() == Frame(PONG, b"x" * 125)


async def test_ping_ten_in_a_row_get_ten_pongs_in_order(echo):
    await echo.send_raw(b"".join(encode_frame(PING, b"%d" % i) for i in range(10)))
    for index in range(10):
        assert await echo.recv() == Frame(PONG, b"%d" % index)


async def test_ping_over_125_bytes_fails_the_connection(echo, verdict):
    await echo.send(PING, b"x" * 126)
    verdict.failed_connection(await echo.ending(), 1002)


@pytest.mark.parametrize("payload", [b"", b"unsolicited"])
async def test_ping_unsolicited_pong_is_ignored(echo, payload):
    await echo.send(PONG, payload)
    await echo.send(TEXT, b"after the pong")
    await assert_echoed(echo, TEXT, b"after the pong")


# -- 3 reserved bits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opcode, rsv",
    [(TEXT, 1), (TEXT, 2), (TEXT, 3), (BINARY, 4), (BINARY, 5), (PING, 6), (CLOSE, 7)],
    ids=["text-1", "text-2", "text-3", "binary-4", "binary-5", "ping-6", "close-7"],
)
async def test_reserved_bits_without_extension_fail_the_connection(echo, verdict, opcode, rsv):
    await echo.send(TEXT, b"before")
    await assert_echoed(echo, TEXT, b"before")
    await echo.send(opcode, close_payload(1000) if opcode == CLOSE else b"x", rsv=rsv)
    verdict.failed_connection(await echo.ending(), 1002)


async def test_reserved_bits_after_a_message_in_the_same_write(echo, verdict):
    """Autobahn 3.2: text, text with RSV, ping in one write. The first echo should come back,
    then the connection fails and no pong is sent."""
    await echo.send_raw(
        encode_frame(TEXT, b"first") + encode_frame(TEXT, b"x", rsv=2) + encode_frame(PING, b"p")
    )
    ending = await echo.ending()
    verdict.failed_connection(ending, 1002)
    assert Frame(PONG, b"p") not in ending.before
    if Frame(TEXT, b"first") not in ending.before:
        verdict.non_strict(
            "the message before the bad frame was not echoed: the connection "
            "was failed before the app's reply was written"
        )


# -- 4 opcodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_reserved_opcode_fails_the_connection(echo, verdict, opcode):
    await echo.send(TEXT, b"before")
    await assert_echoed(echo, TEXT, b"before")
    await echo.send(opcode, b"reserved")
    verdict.failed_connection(await echo.ending(), 1002)


# -- 5 fragmentation ---------------------------------------------------------------------------


async def test_fragmented_text_message_is_assembled(echo):
    await echo.send(TEXT, b"fragment1", fin=False)
    await echo.send(CONTINUATION, b"fragment2", fin=False)
    await echo.send(CONTINUATION, b"fragment3")
    await assert_echoed(echo, TEXT, b"fragment1fragment2fragment3")


async def test_fragmented_binary_message_in_one_byte_fragments_is_assembled(echo):
    payload = bytes(range(64))
    frames = [
        encode_frame(
            BINARY if i == 0 else CONTINUATION, payload[i : i + 1], fin=i == len(payload) - 1
        )
        for i in range(len(payload))
    ]
    await echo.send_raw(b"".join(frames))
    await assert_echoed(echo, BINARY, payload)


async def test_fragments_with_empty_payloads_make_an_empty_message(echo):
    await echo.send(TEXT, b"", fin=False)
    await echo.send(CONTINUATION, b"", fin=False)
    await echo.send(CONTINUATION, b"")
    await assert_echoed(echo, TEXT, b"")


async def test_fragments_with_ping_in_between_get_the_pong_first(echo):
    await echo.send(TEXT, b"fragment1", fin=False)
    await echo.send(PING, b"between")
    assert await echo.recv() == Frame(PONG, b"between")
    await echo.send(CONTINUATION, b"fragment2")
    await assert_echoed(echo, TEXT, b"fragment1fragment2")


async def test_fragments_with_pong_in_between_are_assembled(echo):
    await echo.send_raw(
        encode_frame(TEXT, b"fragment1", fin=False)
        + encode_frame(PONG, b"x")
        + encode_frame(CONTINUATION, b"fragment2")
    )
    await assert_echoed(echo, TEXT, b"fragment1fragment2")


@pytest.mark.parametrize("fin", [True, False], ids=["fin", "not-fin"])
async def test_fragment_continuation_without_a_start_fails_the_connection(echo, verdict, fin):
    await echo.send(CONTINUATION, b"nothing to continue", fin=fin)
    verdict.failed_connection(await echo.ending(), 1002)


async def test_fragment_new_message_inside_a_fragmented_one_fails_the_connection(echo, verdict):
    await echo.send(TEXT, b"fragment1", fin=False)
    await echo.send(TEXT, b"not a continuation")
    verdict.failed_connection(await echo.ending(), 1002)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE], ids=["ping", "pong", "close"])
async def test_fragmented_control_frame_fails_the_connection(echo, verdict, opcode):
    await echo.send(opcode, b"fragment1", fin=False)
    await echo.send(CONTINUATION, b"fragment2")
    verdict.failed_connection(await echo.ending(), 1002)


# -- 6 UTF-8 -----------------------------------------------------------------------------------

VALID_UTF8 = "κόσμε, 𝄞 and ASCII".encode()
INVALID_UTF8 = {
    "lone continuation byte": b"\x80",
    "overlong slash": b"\xc0\xaf",
    "surrogate U+D800": b"\xed\xa0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "byte FE": b"\xfe",
    "truncated 4-byte sequence": b"\xf0\x9d\x84",
}


async def test_utf8_valid_text_is_echoed(echo):
    await echo.send(TEXT, VALID_UTF8)
    await assert_echoed(echo, TEXT, VALID_UTF8)


async def test_utf8_valid_text_split_at_every_byte_across_fragments_is_echoed(echo):
    frames = [
        encode_frame(
            TEXT if i == 0 else CONTINUATION, VALID_UTF8[i : i + 1], fin=i == len(VALID_UTF8) - 1
        )
        for i in range(len(VALID_UTF8))
    ]
    await echo.send_raw(b"".join(frames))
    await assert_echoed(echo, TEXT, VALID_UTF8)


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
async def test_utf8_invalid_text_fails_the_connection_with_1007(echo, verdict, bad):
    await echo.send(TEXT, b"Hello-" + bad + b"-world")
    verdict.failed_connection(await echo.ending(), 1007)


async def test_utf8_invalid_in_a_middle_fragment_fails_fast(echo, verdict):
    """Autobahn 6.4: the connection fails on the bad fragment, before the message ends."""
    await echo.send(TEXT, "κόσμε".encode(), fin=False)
    await echo.send(CONTINUATION, b"\xf4\x90\x80\x80", fin=False)  # the rest never comes
    verdict.failed_connection(await echo.ending(), 1007)


async def test_utf8_sequence_split_across_fragments_and_left_incomplete_fails(echo, verdict):
    await echo.send(TEXT, b"\xf0\x9d", fin=False)
    await echo.send(CONTINUATION, b"\x84")  # the message ends inside the sequence
    verdict.failed_connection(await echo.ending(), 1007)


# -- 7 close -----------------------------------------------------------------------------------


async def test_close_without_payload_is_answered_and_the_tcp_closed(echo):
    await echo.send(CLOSE)
    ending = await echo.ending()
    # No status received (1005) is answered with an empty close frame: 1005 may not be sent.
    assert ending.code is None and ending.reason == b"" and ending.tcp_closed
    assert not ending.before and not ending.after_close


@pytest.mark.parametrize(
    "code",
    [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000, 4999],
)
async def test_close_with_valid_code_is_echoed(echo, code):
    ending = await echo.close_handshake(code, b"bye")
    assert (ending.code, ending.reason, ending.tcp_closed) == (code, b"bye", True)
    assert not ending.before and not ending.after_close


async def test_close_with_code_1014_registered_after_rfc_6455(echo, verdict):
    """1014 (Bad Gateway) is in the IANA registry but not in wsproto's list of known codes."""
    await echo.send(CLOSE, close_payload(1014))
    ending = await echo.ending()
    assert ending.tcp_closed
    if ending.code != 1014:
        verdict.non_strict(f"1014 is refused as a reserved code (close {ending.code})")


async def test_close_with_longest_reason_is_echoed(echo):
    reason = b"r" * 123  # 2 + 123 = 125, the largest control payload
    ending = await echo.close_handshake(1000, reason)
    assert (ending.code, ending.reason) == (1000, reason)


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
async def test_close_with_invalid_code_fails_the_connection(echo, verdict, code):
    await echo.send(CLOSE, close_payload(code))
    verdict.failed_connection(await echo.ending(), 1002)


async def test_close_with_one_byte_payload_fails_the_connection(echo, verdict):
    await echo.send(CLOSE, b"\x03")
    verdict.failed_connection(await echo.ending(), 1002)


async def test_close_with_payload_over_125_bytes_fails_the_connection(echo, verdict):
    await echo.send(CLOSE, close_payload(1000, b"r" * 124))
    verdict.failed_connection(await echo.ending(), 1002)


async def test_close_reason_invalid_utf8_fails_the_connection_with_1007(echo, verdict):
    await echo.send(
        CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")
    )
    verdict.failed_connection(await echo.ending(), 1007)


async def test_close_then_data_and_ping_are_ignored(echo):
    await echo.send_raw(
        encode_frame(CLOSE, close_payload(1000))
        + encode_frame(TEXT, b"late")
        + encode_frame(PING, b"late")
        + encode_frame(CLOSE, close_payload(1001))
    )
    ending = await echo.ending()
    assert (ending.code, ending.tcp_closed) == (1000, True)
    assert not ending.before and not ending.after_close


async def test_close_after_a_message_in_the_same_write(echo, verdict):
    """Autobahn 7.1.6, implementation defined: the echo may or may not be written before the
    close reply, never after it."""
    await echo.send_raw(
        encode_frame(TEXT, b"last words") + encode_frame(CLOSE, close_payload(1000))
    )
    ending = await echo.ending()
    assert (ending.code, ending.tcp_closed) == (1000, True)
    assert not ending.after_close
    assert ending.before in ([], [Frame(TEXT, b"last words")])


# -- 9 limits (WS_MAX_MESSAGE_SIZE) ------------------------------------------------------------


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_limits_message_of_exactly_the_maximum_size_is_echoed(echo, opcode):
    payload = b"m" * MAX_MESSAGE
    await echo.send(opcode, payload)
    await assert_echoed(echo, opcode, payload)


async def test_limits_maximum_size_in_64k_fragments_is_echoed(echo):
    payload = os.urandom(MAX_MESSAGE)
    chunk = 65536
    await echo.send_raw(
        b"".join(
            encode_frame(
                BINARY if start == 0 else CONTINUATION,
                payload[start : start + chunk],
                fin=start + chunk >= len(payload),
            )
            for start in range(0, len(payload), chunk)
        )
    )
    await assert_echoed(echo, BINARY, payload)


async def test_limits_one_byte_over_the_maximum_closes_with_1009(echo):
    await echo.send(BINARY, b"m" * (MAX_MESSAGE + 1))
    ending = await echo.ending()
    assert (ending.code, ending.tcp_closed) == (1009, True)
    assert not ending.before and not ending.after_close


async def test_limits_fragments_over_the_maximum_close_with_1009_before_the_end(echo):
    await echo.send(TEXT, b"m" * MAX_MESSAGE, fin=False)
    await echo.send(CONTINUATION, b"m", fin=False)  # the message is never finished
    ending = await echo.ending()
    assert (ending.code, ending.tcp_closed) == (1009, True)


@pytest.mark.xfail(
    strict=True,
    reason=(
        "Hypercorn 0.18 WSStream._handle_events breaks out of its event loop after the 1009 close "
        "and leaves the client's close frame unparsed when it came in the same read as the rest of "
        "the oversized message: the connection hangs until the client gives up"
    ),
)
async def test_limits_oversized_message_then_close_in_one_write_ends_the_connection(echo):
    await echo.send_raw(
        encode_frame(BINARY, b"m" * (2 * MAX_MESSAGE)) + encode_frame(CLOSE, close_payload(1000))
    )
    ending = await echo.ending()
    assert ending.code == 1009
    assert ending.tcp_closed


async def test_limits_many_small_messages_are_echoed_in_order(echo):
    count = 500
    await echo.send_raw(b"".join(encode_frame(TEXT, b"message %d" % i) for i in range(count)))
    for index in range(count):
        await assert_echoed(echo, TEXT, b"message %d" % index)


# -- 12/13 permessage-deflate (RFC 7692) -------------------------------------------------------

NO_CONTEXT_TAKEOVER = "permessage-deflate; client_no_context_takeover; server_no_context_takeover"


@pytest_asyncio.fixture(loop_scope="module")
async def deflate_echo(echo_port: int) -> AsyncIterator[RawWebSocket]:
    async with connected(echo_port, extensions=NO_CONTEXT_TAKEOVER) as ws:
        yield ws


async def test_deflate_is_negotiated(echo_port):
    async with connected(echo_port, extensions="permessage-deflate; client_max_window_bits") as ws:
        assert ws.deflate, ws.headers
    async with connected(echo_port) as ws:  # not offered, not used
        assert "sec-websocket-extensions" not in ws.headers


@pytest.mark.parametrize("size", [0, 16, 1000, 65536, 300_000])
async def test_deflate_compressed_text_is_echoed(deflate_echo, size):
    payload = (b"compressible text " * (size // 18 + 1))[:size]
    await deflate_echo.send(TEXT, deflate(payload), rsv=4)
    await assert_echoed(deflate_echo, TEXT, payload)
    assert deflate_echo.last_compressed


async def test_deflate_compressed_message_in_fragments_is_echoed(deflate_echo):
    payload = os.urandom(2000) * 10
    compressed = deflate(payload)
    parts = [compressed[i : i + 1000] for i in range(0, len(compressed), 1000)]
    frames = [
        encode_frame(
            BINARY if i == 0 else CONTINUATION,
            part,
            fin=i == len(parts) - 1,
            rsv=4 if i == 0 else 0,
        )
        for i, part in enumerate(parts)
    ]
    await deflate_echo.send_raw(b"".join(frames))
    await assert_echoed(deflate_echo, BINARY, payload)


async def test_deflate_uncompressed_message_is_still_accepted(deflate_echo):
    await deflate_echo.send(TEXT, b"plain")
    await assert_echoed(deflate_echo, TEXT, b"plain")


async def test_deflate_context_takeover_keeps_working_across_messages(echo_port):
    async with connected(echo_port, extensions="permessage-deflate") as ws:
        compressor = zlib.compressobj(wbits=-15)  # one context for the whole connection
        for index in range(20):
            payload = b"repeated message %d " % index * 50
            compressed = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await ws.send(TEXT, compressed[:-4], rsv=4)
            await assert_echoed(ws, TEXT, payload)


async def test_deflate_rsv1_on_a_continuation_fails_the_connection(deflate_echo, verdict):
    await deflate_echo.send(TEXT, deflate(b"first part"), fin=False, rsv=4)
    await deflate_echo.send(CONTINUATION, b"x", rsv=4)
    verdict.failed_connection(await deflate_echo.ending(), 1002)


async def test_deflate_rsv1_on_a_control_frame_fails_the_connection(deflate_echo, verdict):
    await deflate_echo.send(PING, b"x", rsv=4)
    verdict.failed_connection(await deflate_echo.ending(), 1002)


async def test_deflate_bomb_over_the_maximum_closes_with_1009(deflate_echo):
    bomb = deflate(bytes(4 * MAX_MESSAGE))  # 4 MiB of zeros in about 4 KiB
    assert len(bomb) < 10_000
    await deflate_echo.send(BINARY, bomb, rsv=4)
    ending = await deflate_echo.ending()
    assert (ending.code, ending.tcp_closed) == (1009, True)


async def test_deflate_invalid_compressed_data_fails_the_connection(deflate_echo, verdict):
    await deflate_echo.send(TEXT, b"\xff\xff\xff not deflate", rsv=4)
    ending = await deflate_echo.ending()
    assert ending.tcp_closed and not ending.before
    if ending.code is None:
        verdict.non_strict("TCP closed without a close frame (RFC 7692 8: _Fail_, SHOULD close)")
    else:
        assert ending.code in (1002, 1007), ending


# -- /api/ws: the same cases, answered by the gateway's protocol -------------------------------


@asynccontextmanager
async def gateway_client(gateway: RunningGateway) -> AsyncIterator[RawWebSocket]:
    """A raw client past the greeting (`connected`, then `system_status`)."""
    async with connected(gateway.port, "/api/ws") as ws:
        assert (await ws.recv_json())["type"] == "connected"
        assert (await ws.recv_json())["type"] == "system_status"
        yield ws


async def wait_forgotten(gateway: RunningGateway) -> None:
    """The gateway releases every connection within a second."""
    async with asyncio.timeout(1):
        while gateway.gateway.manager.connections:
            await asyncio.sleep(0.01)


async def test_gateway_greeting_is_well_framed_text(gateway):
    async with connected(gateway.port, "/api/ws") as ws:
        opcode, payload = await ws.recv_message()
        assert opcode == TEXT and json.loads(payload)["type"] == "connected"


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_gateway_json_ping_gets_a_pong_event(gateway, opcode):
    async with gateway_client(gateway) as ws:
        await ws.send(opcode, b'{"type": "ping", "request_id": "p1"}')
        reply = await ws.recv_json()
        assert (reply["type"], reply["request_id"]) == ("pong", "p1")


async def test_gateway_fragmented_json_message_is_answered(gateway):
    async with gateway_client(gateway) as ws:
        message = b'{"type": "ping", "request_id": "fragmented"}'
        await ws.send(TEXT, message[:10], fin=False)
        await ws.send(PING, b"between")
        assert await ws.recv() == Frame(PONG, b"between")
        await ws.send(CONTINUATION, message[10:])
        assert (await ws.recv_json())["request_id"] == "fragmented"


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["empty-text", "empty-binary"])
async def test_gateway_empty_message_gets_an_error_event_and_stays_open(gateway, opcode):
    """An empty binary frame reaches the handler as None (Quart 0.22): `handle_message` must
    answer it like an empty text frame, not fail."""
    async with gateway_client(gateway) as ws:
        await ws.send(opcode, b"")
        error = await ws.recv_json()
        assert error["type"] == "error"
        assert error["data"]["code"] == "MESSAGE_PROCESSING_ERROR"
        assert error["data"]["error"] == "Empty message"
        await ws.send(TEXT, b'{"type": "ping"}')
        assert (await ws.recv_json())["type"] == "pong"


async def test_gateway_invalid_json_gets_an_error_event(gateway):
    async with gateway_client(gateway) as ws:
        await ws.send(TEXT, b"{not json")
        error = await ws.recv_json()
        assert (error["type"], error["data"]["error"]) == ("error", "Invalid JSON")


async def test_gateway_control_ping_gets_a_control_pong(gateway):
    async with gateway_client(gateway) as ws:
        await ws.send(PING, b"are you there")
        assert await ws.recv() == Frame(PONG, b"are you there")


@pytest.mark.parametrize("code", [1000, 1001, 4000])
async def test_gateway_close_is_echoed_and_the_connection_released(gateway, code):
    async with gateway_client(gateway) as ws:
        ending = await ws.close_handshake(code, b"done")
        assert (ending.code, ending.tcp_closed) == (code, True)
        assert not ending.after_close
    await wait_forgotten(gateway)


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(TEXT, b'{"type": "ping"}', rsv=2),
        encode_frame(6, b"{}"),
        encode_frame(CONTINUATION, b"{}"),
        encode_frame(PING, b"x" * 126),
        encode_frame(CLOSE, close_payload(1005)),
    ],
    ids=["reserved-bit", "reserved-opcode", "continuation-first", "long-ping", "close-1005"],
)
async def test_gateway_protocol_error_fails_the_connection(gateway, verdict, frame):
    async with gateway_client(gateway) as ws:
        await ws.send_raw(frame)
        verdict.failed_connection(await ws.ending(), 1002)
    await wait_forgotten(gateway)


async def test_gateway_invalid_utf8_fails_the_connection(gateway, verdict):
    async with gateway_client(gateway) as ws:
        await ws.send(TEXT, b'{"type": "\xed\xa0\x80"}')
        verdict.failed_connection(await ws.ending(), 1007)
    await wait_forgotten(gateway)


async def test_gateway_oversized_message_closes_with_1009(gateway):
    async with gateway_client(gateway) as ws:
        await ws.send(TEXT, b" " * (MAX_MESSAGE + 1))
        ending = await ws.ending()
        assert (ending.code, ending.tcp_closed) == (1009, True)
    await wait_forgotten(gateway)


async def test_gateway_sends_no_event_after_its_1009_close_frame(gateway):
    """RFC 6455 5.5.1: after sending a close frame, an endpoint MUST NOT send more data.
    Hypercorn sends the 1009 itself and does not tell the app until the client answers; the
    fast path asks the WebSocket's state before each write."""
    async with gateway_client(gateway) as ws:
        await ws.send(TEXT, b'{"type": "subscribe", "data": {"topics": ["alerts"]}}')
        assert (await ws.recv_json())["type"] == "subscribed"
        await ws.send(TEXT, b" " * (MAX_MESSAGE + 1))
        close = await ws.recv()
        assert close.opcode == CLOSE and close.payload[:2] == close_payload(1009)
        await gateway.publish("alert", {"level": "info", "message": "after the close"})
        await ws.no_frame()
    await wait_forgotten(gateway)


async def test_gateway_sends_no_event_after_the_close_reply_while_publishing(gateway):
    """Events keep coming while the client closes: none may follow the server's close frame."""
    async with gateway_client(gateway) as ws:
        await ws.send(TEXT, b'{"type": "subscribe", "data": {"topics": ["alerts"]}}')
        assert (await ws.recv_json())["type"] == "subscribed"

        async def publish_alerts() -> None:
            for index in range(300):  # about 0.3 s, across the close handshake
                await gateway.publish("alert", {"level": "info", "message": f"alert {index}"})
                await asyncio.sleep(0.001)

        publisher = asyncio.create_task(publish_alerts())
        try:
            await asyncio.sleep(0.05)
            ending = await ws.close_handshake(1000)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        assert ending.before, "no event arrived before the close: the case tested nothing"
        assert (ending.code, ending.tcp_closed, ending.after_close) == (1000, True, [])
    await wait_forgotten(gateway)


async def test_gateway_compressed_ping_is_answered(gateway, request):
    async with connected(gateway.port, "/api/ws", extensions=NO_CONTEXT_TAKEOVER) as ws:
        assert ws.deflate
        assert (await ws.recv_json())["type"] == "connected"
        assert (await ws.recv_json())["type"] == "system_status"
        await ws.send(TEXT, deflate(b'{"type": "ping", "request_id": "z"}'), rsv=4)
        reply = await ws.recv_json()
        assert (reply["type"], reply["request_id"]) == ("pong", "z")
        # RFC 7692 lets the sender choose per message: the fast path writes its pre-built
        # frames uncompressed, Hypercorn (the ASGI path) compresses.
        assert ws.last_compressed == ("asgi-send" in request.node.callspec.id)


# -- Autobahn|Testsuite ------------------------------------------------------------------------

WSTEST = Path(os.environ.get("AUTOBAHN_WSTEST", "/opt/sigmax-autobahn/bin/wstest"))
# Cases that fit the time budget (about 15 s); the README has the longer runs.
ECHO_CASES = [
    "1.*",
    "2.*",
    "3.*",
    "4.*",
    "5.*",
    "6.*",
    "7.*",
    "9.1.1",
    "9.1.2",
    "9.1.3",
    "9.2.1",
    "9.2.2",
    "9.2.3",
    "10.*",
    "12.1.1",
    "12.5.1",
    "13.1.1",
    "13.3.1",
    "13.5.1",
    "13.7.1",
]
# On /api/ws the gateway greets and answers in JSON, so Autobahn's echo check cannot pass there:
# only the cases whose point is the failing or closing of the connection, judged on the close.
NO_ECHO_CASES = [
    "2.5",
    "3.1",
    "4.1.1",
    "4.1.2",
    "4.2.1",
    "4.2.2",
    "5.1",
    "5.2",
    "5.9",
    "5.10",
    "5.11",
    "6.3.*",
    "7.3.*",
    "7.5.1",
    "7.7.*",
    "7.9.*",
]


def write_fuzzingclient_spec(agent: str, url: str, cases: list[str], folder: Path) -> None:
    folder.mkdir()
    spec = {
        "outdir": str(folder),
        "servers": [{"agent": agent, "url": url}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    (folder / "spec.json").write_text(json.dumps(spec))


async def run_fuzzingclient(agent: str, url: str, cases: list[str], folder: Path) -> dict[str, Any]:
    """Run `wstest -m fuzzingclient` on `cases` against `url`; its results by case."""
    write_fuzzingclient_spec(agent, url, cases, folder)
    process = await asyncio.create_subprocess_exec(
        str(WSTEST),
        "-m",
        "fuzzingclient",
        "-s",
        "spec.json",
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    results: dict[str, Any] = json.loads((folder / "index.json").read_bytes())[agent]
    return results


@pytest.mark.skipif(
    not WSTEST.exists() and os.environ.get("SIGMAX_REQUIRE_SERVICES") != "1",
    reason="wstest not installed: bash tests/conformance/install_autobahn.sh "
    "(CI installs it; with SIGMAX_REQUIRE_SERVICES=1 this test fails "
    "instead of skipping)",
)
async def test_autobahn_fuzzingclient_finds_no_failure(
    echo_port, gateway, request, tmp_path, verdict
):
    if "asgi-send" in request.node.callspec.id:
        pytest.skip("once is enough: the write path plays no part in Autobahn's cases")
    echo_results, gateway_results = await asyncio.gather(
        run_fuzzingclient(
            "echo", f"ws://127.0.0.1:{echo_port}{ECHO_PATH}", ECHO_CASES, tmp_path / "echo"
        ),
        run_fuzzingclient(
            "gateway", f"ws://127.0.0.1:{gateway.port}/api/ws", NO_ECHO_CASES, tmp_path / "gateway"
        ),
    )
    assert len(echo_results) > 250 and len(gateway_results) > 40
    failed, non_strict = [], []
    for agent, results, judged in (
        ("echo", echo_results, ("behavior", "behaviorClose")),
        ("gateway", gateway_results, ("behaviorClose",)),
    ):
        for case, result in results.items():
            outcomes = {result[key] for key in judged}
            if FAILED in outcomes:
                failed.append(f"{agent} {case}: {result['behavior']}/{result['behaviorClose']}")
            elif NON_STRICT in outcomes:
                non_strict.append(f"{agent} {case}")
    assert not failed, failed
    if non_strict:
        verdict.non_strict("Autobahn NON-STRICT: " + ", ".join(non_strict))
