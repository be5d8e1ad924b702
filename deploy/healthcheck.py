"""Container health check: exit 0 when healthy, 1 otherwise (Docker HEALTHCHECK, compose healthcheck).

    python healthcheck.py grpc 127.0.0.1:50051 [--service NAME] [--tls [--ca FILE] [--authority NAME]]
    python healthcheck.py http http://127.0.0.1:9401/metrics

grpc: the standard grpc.health.v1.Health/Check must answer SERVING (the server answers NOT_SERVING
while it drains for shutdown, so a draining container is not reported healthy). http: the URL
answers 200 (the standalone trainer serves no gRPC; its metrics endpoint is its liveness).
With TLS, --authority names the certificate's host when probing 127.0.0.1 (the Kubernetes manifests
use this script as an exec probe because the kubelet's native gRPC probe speaks plaintext only).
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def grpc_serving(target: str, service: str, tls: bool, ca_file: str | None, authority: str | None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls:
        roots = Path(ca_file).read_bytes() if ca_file else None
        options = [("grpc.ssl_target_name_override", authority)] if authority else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if status != "SERVING":
        print(f"unhealthy: {status}", file=sys.stderr)
    return status == "SERVING"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status == 200
    except OSError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    check = kinds.add_parser("grpc", help="grpc.health.v1 Check")
    check.add_argument("target", help="HOST:PORT")
    check.add_argument("--service", default="", help='service name ("" is the whole server)')
    check.add_argument("--tls", action="store_true")
    check.add_argument("--ca", default=None, help="PEM roots to verify the server with (default: system roots)")
    check.add_argument("--authority", default=None, help="host name the server's certificate is for")
    http = kinds.add_parser("http", help="HTTP GET answers 200")
    http.add_argument("url")
    args = parser.parse_args(argv)
    if args.kind == "grpc":
        return 0 if grpc_serving(args.target, args.service, args.tls, args.ca, args.authority) else 1
    return 0 if http_ok(args.url) else 1


if __name__ == "__main__":
    sys.exit(main())
