"""`edgeflow publish`: send one member event to the gateway's Publish, as a surface would."""

from __future__ import annotations

import argparse
import json

import grpc

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.shell import auth
from edgeflow.shell.server import configured_channel
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc

TYPES = {
    "connect": gateway_pb2.MemberEvent.CONNECT,
    "disconnect": gateway_pb2.MemberEvent.DISCONNECT,
    "block": gateway_pb2.MemberEvent.BLOCK,
    "dismiss": gateway_pb2.MemberEvent.DISMISS,
    "follow": gateway_pb2.MemberEvent.FOLLOW,
    "deactivate": gateway_pb2.MemberEvent.DEACTIVATE,
    "reactivate": gateway_pb2.MemberEvent.REACTIVATE,
}
STATE_TYPES = ("deactivate", "reactivate")  # about the member alone: no target


def send(addr: str, event: gateway_pb2.MemberEvent) -> gateway_pb2.PublishResponse:
    with configured_channel(addr) as ch:
        stub = gateway_pb2_grpc.RecommenderStub(ch)
        try:
            req = gateway_pb2.PublishRequest(events=[event])
            return stub.Publish(req, timeout=10, metadata=auth.cli_metadata())
        except grpc.RpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}") from None


def run(args: argparse.Namespace) -> int:
    if (args.target is None) != (args.type in STATE_TYPES):
        raise CliError(
            f"--target: a {args.type} names no target" if args.target is not None
            else f"--target: required for a {args.type} (the other member)"
        )  # fmt: skip
    addr = args.addr or config.load().gateway_addr
    event = gateway_pb2.MemberEvent(
        type=TYPES[args.type], member=args.member, target=args.target or 0,
        event_id=args.event_id,
    )  # fmt: skip
    resp = send(addr, event)
    entry, event_id = resp.entry_ids[0], resp.event_ids[0]
    what = f"{args.member}" if args.target is None else f"{args.member} -> {args.target}"
    if args.json:
        print(json.dumps({"event_id": event_id, "entry_id": entry, "duplicate": not entry}))
    elif entry:
        print(f"published {args.type} {what}: event {event_id}, "
              f"stream entry {entry} (stored before the gateway answered)")  # fmt: skip
    else:
        print(f"event {event_id} was published before; nothing new was stored")
    return 0
