"""The bridge map (a TOML file) and the sans-I/O mapping of broker messages to event bodies.

A map names, per route, where messages come from (a NATS subject, an MQTT topic or a RabbitMQ
queue and routing key), which channel type they feed, where the symbol is (a `{symbol}` token
of the subject/topic/routing key, or a message field) and which message field holds each event
field. Nothing here touches a socket: `BridgeMapper.map()` takes a message's route string and
bytes and returns the channel and encoded body, or the reason it does not map.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from tickwire.core.channels import Channel, event_type_of, validate_symbol, validate_type
from tickwire.core.errors import ChannelError, ConfigError
from tickwire.core.events import FIELDS_OF, encode_body
from tickwire.core.tls import ClientTls
from tickwire.core.urls import redact_url

Broker = Literal["nats", "rabbitmq", "mqtt"]
BROKERS: tuple[Broker, ...] = ("nats", "rabbitmq", "mqtt")
SYMBOL_TOKEN = "{symbol}"
MAX_BATCH = 2000

#: Per broker: the level separator of its subjects/topics/routing keys, the one-level and the
#: rest-of-levels wildcards, and the route key that names the pattern in the map.
_SYNTAX: dict[str, tuple[str, str, str, str]] = {
    "nats": (".", "*", ">", "subject"),
    "rabbitmq": (".", "*", "#", "routing_key"),
    "mqtt": ("/", "+", "#", "topic"),
}
#: How each event field is read from a message: numbers may come as JSON strings (many venues
#: send prices as text so that no float rounding happens on the way).
_FLOATS = {"bid", "bid_size", "ask", "ask_size", "price", "size"}
_FLOATS |= {"open", "high", "low", "close", "volume", "vwap"}
_INTS = {"trade_id", "trades", "start", "end"}
_TS_SCALE = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


class Unmapped(Exception):
    """A message that does not map to an event; the text says why (logged, counted)."""


@dataclass(frozen=True, slots=True)
class Template:
    """A subject/topic/routing-key pattern: literal levels, one-level wildcards, `{symbol}`
    (one level, captured) and a trailing rest-of-levels wildcard."""

    text: str
    separator: str
    one: str
    rest: str

    @property
    def levels(self) -> list[str]:
        return self.text.split(self.separator)

    @property
    def has_symbol(self) -> bool:
        return SYMBOL_TOKEN in self.levels

    def check(self, where: str) -> None:
        levels = self.levels
        if levels.count(SYMBOL_TOKEN) > 1:
            raise ConfigError(f"{where}: {self.text!r} holds {SYMBOL_TOKEN} more than once")
        if any(lv == self.rest for lv in levels[:-1]):
            raise ConfigError(f"{where}: {self.rest!r} may only end {self.text!r}")
        if any(not lv or ("{" in lv and lv != SYMBOL_TOKEN) for lv in levels):
            raise ConfigError(f"{where}: {self.text!r} has an empty or malformed level")

    @property
    def subscription(self) -> str:
        """The broker-side filter: `{symbol}` as the broker's one-level wildcard."""
        return self.separator.join(self.one if lv == SYMBOL_TOKEN else lv for lv in self.levels)

    def match(self, route: str) -> str | None:
        """The captured symbol ('' if the template has none), or None when `route` does not match."""
        got = route.split(self.separator)
        want = self.levels
        symbol = ""
        for i, lv in enumerate(want):
            if lv == self.rest and i == len(want) - 1:
                return symbol if len(got) > i else None
            if i >= len(got):
                return None
            if lv == SYMBOL_TOKEN:
                symbol = got[i]
            elif lv != self.one and lv != got[i]:
                return None
        return symbol if len(got) == len(want) else None


@dataclass(frozen=True, slots=True)
class Route:
    """Which messages feed which channel type, and how their fields become the event's."""

    channel: str
    #: The subject/topic/routing-key pattern (None: every message of `queue`, RabbitMQ only).
    template: Template | None
    #: RabbitMQ: the queue consumed; '' for NATS and MQTT.
    queue: str = ""
    #: Message field holding the symbol, when the template has no `{symbol}`.
    symbol_field: str = ""
    #: Event field → message field (dotted path into nested objects); unnamed ones: same name.
    fields: tuple[tuple[str, str], ...] = ()
    #: Event field → constant, for what the messages do not carry (e.g. a bar's interval).
    constants: tuple[tuple[str, Any], ...] = ()
    #: Message field with the venue time; '' stamps the time the bridge received the message.
    ts_field: str = "ts"
    ts_unit: str = "ns"
    #: Message field with a unique id per event, used to store a redelivered event once when the
    #: broker gives none (MQTT) or to override the broker's id; '' for the broker's own.
    id_field: str = ""

    @property
    def event_type(self) -> str:
        return event_type_of(self.channel)


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """The `[bridge]` table: naming, batching, dedupe and what becomes of unmappable messages."""

    #: Names this bridge's dedupe records (`tw:{SYM}:<type>:seen:<name>`), its durable NATS
    #: consumer and its MQTT client id: keep it stable across restarts.
    name: str = "tickwire"
    #: "dead-letter": republish an unmappable message to `dead_letter` with the reason, then
    #: acknowledge it; "skip": acknowledge it (after logging and counting).
    on_unmapped: str = "dead-letter"
    dead_letter: str = ""
    #: At most this many messages are held unacknowledged by the bridge (the broker's prefetch /
    #: max ack pending / MQTT receive maximum): the bound on what the bridge buffers.
    max_in_flight: int = 1000
    #: Messages per Redis append, at most.
    batch: int = 500
    #: Broker ids remembered per channel (and bridge): a redelivered message is one of the last
    #: `max_in_flight` at most, so this covers many restarts' worth of redeliveries.
    dedupe_window: int = 10_000


@dataclass(frozen=True, slots=True)
class BridgeMap:
    broker: Broker
    options: BridgeOptions
    routes: tuple[Route, ...]
    #: The broker table (`[nats]`, `[rabbitmq]`, `[mqtt]`), read by that broker's adapter.
    broker_options: dict[str, Any] = field(default_factory=dict)
    #: The broker table's TLS keys (`tls_ca_file`, …), None if it has none.
    tls: ClientTls | None = None

    def over_tls(self, url: str, schemes: tuple[str, ...]) -> bool:
        """Whether `url` is a TLS one (its scheme among `schemes`, the first the usual one);
        ConfigError if the broker table has TLS keys and it is not (they would be ignored)."""
        tls = urlsplit(url).scheme in schemes
        if self.tls is not None and not tls:
            raise ConfigError(
                f"[{self.broker}] tls_* keys need an {schemes[0]}:// URL, not {redact_url(url)!r}"
            )
        return tls

    @property
    def queues(self) -> list[str]:
        return list(dict.fromkeys(r.queue for r in self.routes if r.queue))


def load_bridge_map(path: str | Path, broker: Broker) -> BridgeMap:
    """Read and check a map file; ConfigError says what is wrong and where."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read bridge map {path}: {exc}") from None
    return parse_bridge_map(data, broker, str(path))


def parse_bridge_map(data: dict[str, Any], broker: Broker, where: str = "map") -> BridgeMap:
    if broker not in BROKERS:
        raise ConfigError(f"unknown broker {broker!r}: expected one of {', '.join(BROKERS)}")
    data = dict(data)
    options = _options(data.pop("bridge", {}), f"{where} [bridge]")
    routes_data = data.pop("route", [])
    broker_options: dict[str, Any] = {}
    tls: ClientTls | None = None
    for name in BROKERS:
        table = data.pop(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        if name == broker:
            broker_options = dict(table)
            tls = _pop_tls(broker_options, f"{where} [{name}]")
    if data:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(sorted(data))}")
    if not isinstance(routes_data, list) or not routes_data:
        raise ConfigError(f"{where}: no [[route]]: say which messages feed which channel")
    routes = tuple(
        _route(r, broker, f"{where} [[route]] #{i}") for i, r in enumerate(routes_data, 1)
    )
    if options.on_unmapped == "dead-letter" and not options.dead_letter:
        raise ConfigError(
            f"{where} [bridge]: on_unmapped = 'dead-letter' needs dead_letter = the "
            "subject/topic/queue to send them to (or on_unmapped = 'skip')"
        )
    return BridgeMap(broker, options, routes, broker_options, tls)


#: A broker table's TLS keys (used with a TLS URL: `amqps://`, `tls://`, `mqtts://`; a TLS URL
#: without them trusts the system's CAs).
TLS_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _pop_tls(table: dict[str, Any], where: str) -> ClientTls | None:
    """Take the TLS keys out of a broker table; None if it has none."""
    given = {k: str(table.pop(k)) for k in TLS_KEYS if k in table}
    if not given:
        return None
    tls = ClientTls(given.get("tls_ca_file"), given.get("tls_cert_file"), given.get("tls_key_file"))
    return tls.checked(where, "tls_key_file without tls_cert_file")


def _options(table: Any, where: str) -> BridgeOptions:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    opts = BridgeOptions()
    known = set(BridgeOptions.__dataclass_fields__)
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        if type(value) is not type(getattr(opts, key)):
            raise ConfigError(f"{where}: {key} must be {type(getattr(opts, key)).__name__}")
    opts = BridgeOptions(**table)
    if opts.on_unmapped not in ("dead-letter", "skip"):
        raise ConfigError(f"{where}: on_unmapped must be 'dead-letter' or 'skip'")
    for key in ("max_in_flight", "batch", "dedupe_window"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"{where}: {key} must be at least 1")
    if opts.batch > MAX_BATCH:
        # The append records a round's ids with one ZADD per channel, its arguments unpacked
        # onto Lua's stack (8 000 slots).
        raise ConfigError(f"{where}: batch must be at most {MAX_BATCH}")
    if not opts.name or any(c in opts.name for c in "{}: ./*>#+"):
        raise ConfigError(f"{where}: name must be non-empty, without {{}}: ./*>#+ or spaces")
    return opts


_ROUTE_KEYS = {
    "channel",
    "subject",
    "topic",
    "queue",
    "routing_key",
    "symbol_field",
    "fields",
    "const",
    "ts_field",
    "ts_unit",
    "id_field",
}


def _route(table: Any, broker: Broker, where: str) -> Route:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        channel = validate_type(str(table.get("channel", "")))
    except ChannelError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    sep, one, rest, key = _SYNTAX[broker]
    for other in ("subject", "topic", "routing_key"):
        if other != key and other in table:
            raise ConfigError(f"{where}: {other!r} is not a {broker} key; use {key!r}")
    queue = str(table.get("queue", ""))
    if broker == "rabbitmq" and not queue:
        raise ConfigError(f"{where}: name the queue the route consumes (queue = ...)")
    if broker != "rabbitmq" and queue:
        raise ConfigError(f"{where}: 'queue' is for rabbitmq; use {key!r}")
    template: Template | None = None
    if key in table:
        template = Template(str(table[key]), sep, one, rest)
        template.check(where)
    elif broker != "rabbitmq":
        raise ConfigError(f"{where}: name the {key} the route consumes ({key} = ...)")
    symbol_field = str(table.get("symbol_field", ""))
    has_symbol = template is not None and template.has_symbol
    if has_symbol == bool(symbol_field):
        raise ConfigError(
            f"{where}: take the symbol from exactly one place: a {SYMBOL_TOKEN} level of the "
            f"{key}, or symbol_field"
        )
    fields = table.get("fields", {})
    constants = table.get("const", {})
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise ConfigError(f'{where}: fields must map event field = "message field"')
    if not isinstance(constants, dict):
        raise ConfigError(f"{where}: const must be a table")
    names = set(FIELDS_OF[event_type_of(channel)])
    bad = (set(fields) | set(constants)) - names
    if bad:
        raise ConfigError(
            f"{where}: {', '.join(sorted(bad))} not a field of {event_type_of(channel)} "
            f"events ({', '.join(FIELDS_OF[event_type_of(channel)])})"
        )
    ts_unit = str(table.get("ts_unit", "ns"))
    if ts_unit not in _TS_SCALE:
        raise ConfigError(f"{where}: ts_unit must be one of {', '.join(_TS_SCALE)}")
    if channel.startswith("bars."):
        constants = {"interval": channel.partition(".")[2], **constants}
    return Route(
        channel=channel,
        template=template,
        queue=queue,
        symbol_field=symbol_field,
        fields=tuple((k, v) for k, v in fields.items()),
        constants=tuple(constants.items()),
        ts_field=str(table.get("ts_field", "ts")),
        ts_unit=ts_unit,
        id_field=str(table.get("id_field", "")),
    )


@dataclass(frozen=True, slots=True)
class MappedEvent:
    channel: Channel
    body: bytes
    #: The id the event is stored once under ('' : none, so a redelivery may store it again).
    msg_id: str


#: Route keys whose route `BridgeMapper` remembers.
ROUTE_CACHE_SIZE = 65_536


class BridgeMapper:
    """Broker message → (channel, encoded body); sans-I/O."""

    def __init__(self, bridge_map: BridgeMap) -> None:
        self.map_ = bridge_map
        # Per route: every event field and the message path it is read from, split once.
        self._plans: list[tuple[Route, list[tuple[str, list[str]]]]] = []
        for route in bridge_map.routes:
            named = dict(route.fields)
            consts = {k for k, _ in route.constants}
            plan = [
                (name, named.get(name, name).split("."))
                for name in FIELDS_OF[route.event_type]
                if name not in consts
            ]
            self._plans.append((route, plan))
        #: `route_of`'s answers by (route key, queue): a desk's subjects repeat (one or a few
        #: per symbol), and matching them against the templates was a tenth of a bridge's CPU.
        self._routes: dict[tuple[str, str], tuple[Route, list[tuple[str, list[str]]], str]] = {}

    def route_of(
        self, route_key: str, queue: str = ""
    ) -> tuple[Route, list[tuple[str, list[str]]], str]:
        key = (route_key, queue)
        found = self._routes.get(key)
        if found is None:
            found = self._match(route_key, queue)
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()  # subjects without bound (an id in each): start over
            self._routes[key] = found
        return found

    def _match(self, route_key: str, queue: str) -> tuple[Route, list[tuple[str, list[str]]], str]:
        for route, plan in self._plans:
            if route.queue != queue:
                continue
            if route.template is None:
                return route, plan, ""
            symbol = route.template.match(route_key)
            if symbol is not None:
                return route, plan, symbol
        where = f"queue {queue!r} routing key" if queue else "subject/topic"
        raise Unmapped(f"no route matches {where} {route_key!r}")

    def map(
        self, route_key: str, payload: bytes, *, now_ns: int, broker_id: str = "", queue: str = ""
    ) -> MappedEvent:
        """The event a message carries; Unmapped says why there is none."""
        route, plan, symbol = self.route_of(route_key, queue)
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise Unmapped(f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise Unmapped(f"not a JSON object but {type(doc).__name__}")
        if route.symbol_field:
            value = _get(doc, route.symbol_field.split("."))
            if not isinstance(value, str):
                raise Unmapped(f"no string symbol in field {route.symbol_field!r}")
            symbol = value
        try:
            channel = Channel(route.channel, validate_symbol(symbol))
        except ChannelError as exc:
            raise Unmapped(str(exc)) from None
        fields: dict[str, Any] = {}
        for name, path in plan:
            value = _get(doc, path)
            if value is None:
                raise Unmapped(f"no {'.'.join(path)!r} for {route.event_type} field {name!r}")
            fields[name] = _coerce(name, value)
        fields.update(route.constants)
        # The event model's field order: encode_body writes them as given.
        ordered = {n: fields[n] for n in FIELDS_OF[route.event_type]}
        if route.ts_field:
            raw = _get(doc, route.ts_field.split("."))
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
                raise Unmapped(f"no numeric venue time in field {route.ts_field!r}")
            ts = int(raw * _TS_SCALE[route.ts_unit])
        else:
            ts = now_ns
        msg_id = broker_id
        if route.id_field:
            raw_id = _get(doc, route.id_field.split("."))
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
                raise Unmapped(f"no id in field {route.id_field!r}")
            msg_id = str(raw_id)
        body = encode_body(route.event_type, channel.symbol, ts, now_ns, ordered)
        return MappedEvent(channel, body, msg_id)


def _get(doc: dict[str, Any], path: list[str]) -> Any:
    value: Any = doc
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _coerce(name: str, value: Any) -> Any:
    if name in _FLOATS:
        if isinstance(value, bool):
            raise Unmapped(f"{name} is not a number: {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise Unmapped(f"{name} is not a number: {value!r}") from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise Unmapped(f"{name} is not a finite number: {value!r}")
        return value
    if name in _INTS:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Unmapped(f"{name} is not an integer: {value!r}")
        return value
    if name == "side":
        if value not in ("buy", "sell"):
            raise Unmapped(f"side must be 'buy' or 'sell', not {value!r}")
        return value
    if not isinstance(value, str):
        raise Unmapped(f"{name} is not a string: {value!r}")
    return value
