"""Protocol v1 message validators built from docs/asyncapi.yaml, for any test that sees frames.

Use from any test directory (pytest's importlib mode makes `tests` importable):

    from tests.contract.schemas import validate_server_frame, validate_server_message

    for msg in validate_server_frame(raw_frame):   # a frame is one object or an array of them
        ...

Which message a payload is comes from the document itself: the operations say which messages
the server receives (client requests, keyed by `op`) and which it sends (keyed by `type`).

Strict by default: every message object the document describes may carry only the fields it
declares, so a field the server adds must be added to the contract first (see "Versioning" in
the document). Events stay open, as the contract says (`additionalProperties: true`): fields are
only ever added within `v: 1`. Besides the JSON Schemas, `events` messages are checked for what
a schema cannot say: every event belongs to `ch` and `epoch`, and their seqs are consecutive.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
_BASE_URI = "urn:tickwire:asyncapi"


class ContractViolation(AssertionError):
    """A message does not match docs/asyncapi.yaml (an AssertionError, so pytest shows it well)."""


@dataclass(frozen=True)
class MessageSpec:
    """One message of the document: its component name, discriminator value and validator."""

    name: str
    key: str
    validator: Draft7Validator
    examples: tuple[Any, ...]


class Contract:
    """The validators of one AsyncAPI document: requests by `op`, server messages by `type`."""

    def __init__(self, document: Mapping[str, Any], *, strict: bool = True) -> None:
        self.document = document
        schema_doc = _close_objects(document) if strict else copy.deepcopy(dict(document))
        registry: Registry[Any] = Registry().with_resource(
            _BASE_URI, Resource.from_contents(schema_doc, default_specification=DRAFT7)
        )
        self._registry = registry
        self._schema_doc = schema_doc
        self.client: dict[str, MessageSpec] = {}
        self.server: dict[str, MessageSpec] = {}
        for op_name, op in document["operations"].items():
            incoming = op["action"] == "receive"
            for ref in op.get("messages", []):
                self._add(ref["$ref"], self.client if incoming else self.server, registry)
            for ref in op.get("reply", {}).get("messages", []):
                self._add(ref["$ref"], self.server, registry)
            if not op.get("messages"):
                raise ContractViolation(f"operation {op_name} names no message")

    def _add(self, ref: str, into: dict[str, MessageSpec], registry: Registry[Any]) -> None:
        pointer = _component_pointer(self.document, ref)
        message = _resolve(self.document, pointer)
        payload = message["payload"]
        field = "type" if into is self.server else "op"
        key = payload["properties"][field]["const"]
        if key in into:
            if into[key].name != pointer:
                raise ContractViolation(f"two messages claim {field}={key!r}")
            return
        # Local $refs inlined once: resolving them through the registry on every validation
        # cost ~20 ms per events message, too slow to check what the server tests receive.
        payload_schema = _inline_refs(
            _resolve(self._schema_doc, pointer)["payload"], self._schema_doc
        )
        validator = Draft7Validator(payload_schema, registry=registry)
        examples = tuple(example["payload"] for example in message.get("examples", []))
        into[key] = MessageSpec(pointer, key, validator, examples)

    def schema_validator(self, name: str) -> Draft7Validator:
        """A validator for `#/components/schemas/<name>`."""
        return Draft7Validator(
            {"$ref": f"{_BASE_URI}#/components/schemas/{name}"}, registry=self._registry
        )

    # -- validation

    def validate_client_message(self, obj: Any) -> None:
        """Raise ContractViolation unless `obj` is a valid client request."""
        spec = self._spec(obj, "op", self.client, "client request")
        _check(spec, obj)

    def validate_server_message(self, obj: Any) -> None:
        """Raise ContractViolation unless `obj` is a valid server message."""
        spec = self._spec(obj, "type", self.server, "server message")
        _check(spec, obj)
        if spec.key == "events":
            _check_events(obj)
        elif spec.key == "gap" and obj["from_seq"] > obj["to_seq"]:
            raise ContractViolation(f"gap from_seq > to_seq: {obj}")

    def validate_server_frame(self, data: str | bytes) -> list[dict[str, Any]]:
        """Parse one server text frame (an object or an array of them), validate each message."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ContractViolation(f"server frame is not JSON: {exc}: {data[:200]!r}") from None
        messages = doc if isinstance(doc, list) else [doc]
        if not messages:
            raise ContractViolation("server frame is an empty array")
        for message in messages:
            self.validate_server_message(message)
        return messages

    def _spec(self, obj: Any, field: str, specs: dict[str, MessageSpec], what: str) -> MessageSpec:
        if not isinstance(obj, dict):
            raise ContractViolation(f"{what} must be a JSON object, got {type(obj).__name__}")
        key = obj.get(field)
        spec = specs.get(key) if isinstance(key, str) else None
        if spec is None:
            raise ContractViolation(
                f"{what} has {field}={key!r}; the contract knows {sorted(specs)}: {obj}"
            )
        return spec

    def all_examples(self) -> Iterator[tuple[str, str, Any]]:
        """(direction, message key, example payload) for every example of every message."""
        for direction, specs in (("client", self.client), ("server", self.server)):
            for spec in specs.values():
                for example in spec.examples:
                    yield direction, spec.key, example


def _check(spec: MessageSpec, obj: Any) -> None:
    errors = [leaf for e in spec.validator.iter_errors(obj) for leaf in _leaves(e)]
    if errors:
        errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
        lines = "\n".join(f"  at {_where(e)}: {e.message[:300]}" for e in errors[:10])
        raise ContractViolation(f"{spec.key} message does not match {spec.name}:\n{lines}\n{obj}")


def _leaves(error: ValidationError) -> list[ValidationError]:
    """For a failed oneOf, the errors of the alternative whose `type` matched (the event kind)."""
    if error.validator != "oneOf" or not error.context:
        return [error]
    by_branch: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        by_branch.setdefault(sub.schema_path[0], []).append(sub)
    matched = [
        subs
        for subs in by_branch.values()
        if not any(list(s.relative_path) == ["type"] for s in subs)
    ]
    if len(matched) != 1:
        return [error]
    return [leaf for sub in matched[0] for leaf in _leaves(sub)]


def _where(error: ValidationError) -> str:
    return "/" + "/".join(str(p) for p in error.absolute_path)


def _channel_of(event: Mapping[str, Any]) -> str:
    kind = {"quote": "quotes", "trade": "trades"}.get(event["type"])
    if kind is None:
        kind = f"bars.{event['interval']}"
    return f"{kind}:{event['sym']}"


def _check_events(msg: Mapping[str, Any]) -> None:
    events = msg["events"]
    for i, event in enumerate(events):
        if _channel_of(event) != msg["ch"]:
            raise ContractViolation(f"events[{i}] is of {_channel_of(event)}, not {msg['ch']}")
        if event["epoch"] != msg["epoch"]:
            raise ContractViolation(f"events[{i}] has epoch {event['epoch']}, not {msg['epoch']}")
        if i and event["seq"] != events[i - 1]["seq"] + 1:
            raise ContractViolation(
                f"{msg['ch']}: seqs not consecutive: {events[i - 1]['seq']} then {event['seq']}"
            )


def _component_pointer(document: Mapping[str, Any], ref: str) -> str:
    """Follow `#/channels/ws/messages/x` (itself a $ref) to `/components/messages/X`."""
    pointer = ref.removeprefix("#")
    target = _resolve(document, pointer)
    while "$ref" in target:
        pointer = target["$ref"].removeprefix("#")
        target = _resolve(document, pointer)
    return pointer


def _resolve(document: Mapping[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.strip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _close_objects(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy in which every object schema that does not say otherwise rejects unknown fields.

    An `if` schema (and all inside it) is left open: it is a condition on some fields of a
    message whose fields are declared (and closed) by the enclosing schema, so closing it would
    make it never match.
    """
    doc = copy.deepcopy(dict(document))

    def visit(node: Any, *, condition: bool = False) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if (
                not condition
                and isinstance(properties, dict)
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key == "properties" and value is properties and isinstance(value, dict):
                    for schema in value.values():  # field names are not keywords
                        visit(schema, condition=condition)
                else:
                    visit(value, condition=condition or key == "if")
        elif isinstance(node, list):
            for value in node:
                visit(value, condition=condition)

    visit(doc["components"])
    return doc


def _inline_refs(node: Any, document: Mapping[str, Any], depth: int = 0) -> Any:
    """A copy of `node` with local `#/...` references replaced by their targets."""
    if depth > 50:
        raise ContractViolation("reference cycle in the contract's schemas")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target = _inline_refs(_resolve(document, ref[1:]), document, depth + 1)
            rest = {k: _inline_refs(v, document, depth) for k, v in node.items() if k != "$ref"}
            return {"allOf": [target, rest]} if rest else target
        return {k: _inline_refs(v, document, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, document, depth) for v in node]
    return node


def load_document(path: Path = DOCUMENT_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not str(doc.get("asyncapi", "")).startswith("3."):
        raise ContractViolation(f"{path} is not an AsyncAPI 3 document")
    return doc


@functools.cache
def load_contract(path: Path = DOCUMENT_PATH, *, strict: bool = True) -> Contract:
    """The contract of `path`, built once per process."""
    return Contract(load_document(path), strict=strict)


def validate_client_message(obj: Any) -> None:
    """Raise ContractViolation unless `obj` is a valid protocol v1 client request."""
    load_contract().validate_client_message(obj)


def validate_server_message(obj: Any) -> None:
    """Raise ContractViolation unless `obj` is a valid protocol v1 server message."""
    load_contract().validate_server_message(obj)


def validate_server_frame(data: str | bytes) -> list[dict[str, Any]]:
    """Validate one server text frame (object or array); returns its messages."""
    return load_contract().validate_server_frame(data)
