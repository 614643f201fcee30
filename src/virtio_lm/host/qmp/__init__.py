"""The host's monitor: QEMU's QMP wire protocol over a unix or TCP socket.

Three layers:

* :class:`CommandTable` -- the commands a monitor knows: name, handler,
  argument schema.  Built in: ``qmp_capabilities``, ``query-version``,
  ``query-commands``.  The host process registers the rest.
* :class:`QmpConnection` -- the sans-I/O protocol of one client: bytes in,
  requests out, bytes back.  Greeting, capabilities negotiation, request
  checking, argument checking, dispatch, responses, events.
* :class:`QmpServer` -- an asyncio event loop in a background thread that
  listens, accepts many clients, runs each :class:`QmpConnection`, and a
  dispatcher thread that runs command handlers.

Wire format (as QEMU's ``docs/interop/qmp-spec``)
-------------------------------------------------
Each server message is one JSON object followed by ``\\r\\n``.  On connect
the server sends the greeting::

    {"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0},
                         "package": "virtio-lm 0.1.0"},
             "capabilities": []}}

Version scheme: ``qemu`` is the QEMU release whose QMP migration interface
(command names, argument and field names, units) this monitor follows
(:data:`QEMU_COMPAT_VERSION`), so tools that gate features on the QEMU
version see the interface they expect; ``package`` names virtio-lm and its
own version.  (The ``qemu.qmp`` client only checks that ``version`` is an
object and ``capabilities`` an array.)  No capability is offered: there is
no out-of-band execution, so ``exec-oob`` is refused like any unexpected
member, and ``qmp_capabilities`` with ``enable: ["oob"]`` fails.

Clients send JSON objects, with or without newlines between them, split
across reads or several per read.  A request is
``{"execute": NAME, "arguments": {...}, "id": ANY}`` (``arguments`` and
``id`` optional); the answer is ``{"return": VALUE, "id": ID}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ID}`` (``id`` echoed when
the request had one).  Events are
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
"microseconds": US}}`` (``data`` omitted for events without data), sent to
every client that has completed negotiation.

Until a client has run ``qmp_capabilities``, every other command fails with
``CommandNotFound`` "Expecting capabilities negotiation with
'qmp_capabilities'"; a second ``qmp_capabilities`` fails with
``CommandNotFound`` too.  Malformed input gets QEMU's ``GenericError``
texts ("JSON parse error, ...", "QMP input must be a JSON object", "QMP
input lacks member 'execute'", ...), with no ``id`` when the input could not
be read as an object.  Argument errors use QEMU's texts: "Parameter 'x' is
unexpected", "Parameter 'x' is missing", "Invalid parameter type for 'x',
expected: integer", "Parameter 'x' does not accept value 'y'".

Bounds (hostile clients)
------------------------
* One message may hold at most ``max_message`` bytes (default 1 MiB) and
  nest at most ``max_depth`` (default 64) arrays/objects.  Past either the
  client gets an error (no ``id``) and is disconnected
  (:class:`~virtio_lm.errors.QmpLimitError` as the connection's
  ``close_reason``): an unterminated message cannot be resynchronised.
* Garbage that *is* delimited (a stray token, a bad object) gets an error
  and the stream goes on with the next message.
* The server reads no further while a client has a command running and
  ``read_high_water`` bytes (default 256 KiB) waiting: a client flooding
  commands is slowed by TCP, not buffered without end.
* A client that does not read what it is sent (responses, events) is
  disconnected once ``max_output`` bytes (default 4 MiB) wait for it.
* At most ``max_clients`` (default 64) clients; more are closed at once.

Threads and handlers
--------------------
The event loop thread does all socket I/O, parsing, request checking and
the built-in commands.  Every registered command's handler runs on one
dispatcher thread, one command at a time in arrival order over all
clients (as QEMU runs QMP commands under its big lock), so handlers never
race each other and may block; a blocking handler delays other clients'
commands but never I/O, greetings, events or the built-ins.  Long work
(``migrate``) should start a job and return at once, as in QEMU.  Each
client has at most one command in flight, so its answers come back in
request order.  :meth:`QmpServer.emit_event` may be called from any thread
(handlers included: an event emitted while a command runs reaches the
client before that command's answer).  :meth:`QmpServer.close` may be
called from any thread, a handler too (``quit``): that handler's answer is
still delivered before the connections close.

Handlers receive one ``dict`` of validated arguments (optional arguments
that were not given are absent) and return a JSON-able value (``None``
answers ``{}``), or raise :class:`~virtio_lm.errors.QmpError` with a QMP
error class.  Any other :class:`~virtio_lm.errors.VirtioLmError` answers
``GenericError`` with its message; any other exception is a bug: it is
logged with its traceback and answers ``GenericError`` "internal error
...", and the monitor keeps serving.

The package is laid out the way h11 lays out a protocol: :mod:`.commands` (argument
schemas, the command table), :mod:`.framing` (encoding, events, the sans-I/O
:class:`QmpConnection`), :mod:`.server` (the asyncio server, one connection per
client); this module gathers their public names.
"""

from virtio_lm.host.qmp.commands import (
    ALREADY_NEGOTIATED_DESC,
    BUILTINS,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_READ_HIGH_WATER,
    NEGOTIATION_DESC,
    PACKAGE,
    QEMU_COMPAT_VERSION,
    Command,
    CommandTable,
    Handler,
)
from virtio_lm.host.qmp.framing import QmpConnection, Request, encode, make_event
from virtio_lm.host.qmp.server import MonitorAddress, QmpServer

__all__ = [
    "ALREADY_NEGOTIATED_DESC",
    "BUILTINS",
    "Command",
    "CommandTable",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_READ_HIGH_WATER",
    "Handler",
    "MonitorAddress",
    "NEGOTIATION_DESC",
    "PACKAGE",
    "QEMU_COMPAT_VERSION",
    "QmpConnection",
    "QmpServer",
    "Request",
    "encode",
    "make_event",
]
