#!/usr/bin/env python3
"""Calls a helloworld Greeter with Python's grpcio and checks what it answers.

A client that is not ours, against one server address (no discovery): one `SayHello`, then
`grpc.health.v1.Health/Check` for the whole server ("") and for `helloworld.Greeter`. Stubs are
generated from `proto/helloworld.proto`; the health stubs come with grpcio-health-checking.

    python3 -m grpc_tools.protoc -Iproto --python_out=STUBS --grpc_python_out=STUBS helloworld.proto
    python3 interop/python/greeter_client.py --stubs STUBS --target 127.0.0.1:50051 \\
        --expect-instance-id 127.0.0.1-50051 --expect-addr 127.0.0.1:50051

Prints one line per check. Exits 0 when every check passed, 1 when a call failed or an answer was
not the expected one (the line starting `FAIL` says which), 2 on bad arguments.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("", "helloworld.Greeter")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stubs",
        required=True,
        help="directory holding helloworld_pb2.py and helloworld_pb2_grpc.py",
    )
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--name", default="python", help="the name to greet")
    parser.add_argument(
        "--expect-instance-id", help="fail unless HelloReply.instance_id is this"
    )
    parser.add_argument("--expect-addr", help="fail unless HelloReply.addr is this")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of each call, in seconds"
    )
    return parser.parse_args()


def main():
    args = parse_args()
    # The stubs are generated at run time (never committed), so they are imported from --stubs.
    sys.path.insert(0, args.stubs)
    import helloworld_pb2
    import helloworld_pb2_grpc

    failures = []

    def check(ok, what):
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    with grpc.insecure_channel(args.target) as channel:
        try:
            reply = helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                helloworld_pb2.HelloRequest(name=args.name), timeout=args.timeout
            )
            print(
                f"SayHello: message={reply.message!r} instance_id={reply.instance_id!r} "
                f"addr={reply.addr!r}",
                flush=True,
            )
            check(
                reply.message.startswith(f"Hello {args.name}"),
                f"message greets {args.name!r}",
            )
            if args.expect_instance_id is not None:
                check(
                    reply.instance_id == args.expect_instance_id,
                    f"instance_id is {args.expect_instance_id!r}",
                )
            if args.expect_addr is not None:
                check(reply.addr == args.expect_addr, f"addr is {args.expect_addr!r}")
        except grpc.RpcError as e:
            check(False, f"SayHello failed: {e.code().name}: {e.details()}")

        health = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            try:
                response = health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=args.timeout
                )
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as e:
                status = f"{e.code().name}: {e.details()}"
            print(f"Health/Check {service!r}: {status}", flush=True)
            check(status == "SERVING", f"{service!r} is SERVING")

    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
