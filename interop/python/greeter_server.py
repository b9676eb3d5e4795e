#!/usr/bin/env python3
"""A helloworld Greeter written with Python's grpcio: a server that is not ours.

It serves `helloworld.Greeter` from stubs generated out of `proto/helloworld.proto`, and
`grpc.health.v1.Health` when grpcio-health-checking is installed. It does not register itself:
whoever runs it puts its address in etcd (the tests and the README use `etcdctl put`), the way a
service managed by another tool would appear to our Rust client.

    python3 -m grpc_tools.protoc -Iproto --python_out=STUBS --grpc_python_out=STUBS helloworld.proto
    python3 interop/python/greeter_server.py --stubs STUBS --port 50061

Prints `serving on HOST:PORT` once it accepts calls, one line per call, and exits 0 on SIGTERM or
SIGINT after reporting NOT_SERVING and letting in-flight calls finish.
"""

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc

try:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError:  # grpcio-health-checking is optional here; the Rust client copes without it
    health = None

log = logging.getLogger("greeter_server")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stubs",
        required=True,
        help="directory holding helloworld_pb2.py and helloworld_pb2_grpc.py",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument(
        "--port", type=int, required=True, help="port to listen on (0 picks one)"
    )
    parser.add_argument(
        "--instance-id",
        help="identity put in every reply [default: python-<port>]; "
        "match it to the last segment of the etcd key",
    )
    parser.add_argument(
        "--no-health",
        action="store_true",
        help="do not serve grpc.health.v1, like grpc's stock example servers",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds in-flight calls may take to finish on shutdown",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    # logging flushes after every record: a test waits for the "serving on" line in this output,
    # so it must reach the pipe or file at once, not when a buffer fills.
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")

    # The stubs are generated at run time (never committed), so they are imported from --stubs.
    sys.path.insert(0, args.stubs)
    import helloworld_pb2
    import helloworld_pb2_grpc

    if health is None:
        log.warning("grpcio-health-checking is not installed: serving without grpc.health.v1")

    class Greeter(helloworld_pb2_grpc.GreeterServicer):
        """Answers like our Rust Greeter: who served the call, at which address."""

        def __init__(self, instance_id, addr):
            self.instance_id = instance_id
            self.addr = addr

        def SayHello(self, request, context):
            name = request.name or "stranger"
            log.info("SayHello name=%s peer=%s", request.name, context.peer())
            return helloworld_pb2.HelloReply(
                message=f"Hello {name}, from {self.instance_id}",
                instance_id=self.instance_id,
                addr=self.addr,
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    bind = f"{args.host}:{args.port}"
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError:  # recent grpcio raises; older versions returned 0
        port = 0
    if port == 0:
        log.error("cannot listen on %s; is another process using the port?", bind)
        return 1
    addr = f"{args.host}:{port}"
    instance_id = args.instance_id or f"python-{port}"

    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(instance_id, addr), server)
    health_servicer = None
    if health is not None and not args.no_health:
        health_servicer = health.HealthServicer()
        for service in ("", "helloworld.Greeter"):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    # The handler only sets a flag: the main thread does the shutdown, outside signal context.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())

    server.start()
    log.info(
        "serving on %s as %s (health: %s)",
        addr,
        instance_id,
        "yes" if health_servicer else "no",
    )
    stop.wait()

    log.info("shutting down: NOT_SERVING, then draining for up to %.1fs", args.grace)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    server.stop(args.grace).wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
