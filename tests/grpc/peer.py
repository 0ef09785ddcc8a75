"""A real gRPC peer (grpcio) for tests/api/grpc.rs: `server` runs a health service and a bytes-in,
bytes-out test service; `client TARGET TOKEN` calls them through idsync and prints one JSON object of
what it saw. Messages are raw bytes (identity serializers), so no generated code is needed."""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "idsync.test.Echo"
cancelled = []


def metadata(ctx):
    return {k: v for k, v in ctx.invocation_metadata()}


def unary(request, ctx):
    md = metadata(ctx)
    ctx.set_trailing_metadata((("x-upstream-trailer", "kept"),))
    return json.dumps(
        {
            "echo": request.decode(),
            "user": md.get("x-user-id"),
            "tenant": md.get("x-tenant-id"),
            "role": md.get("x-user-role"),
            "traceparent": md.get("traceparent"),
            "grpc_timeout_left": ctx.time_remaining(),
        }
    ).encode()


def client_stream(requests, ctx):
    return b"|".join(requests)


def server_stream(request, ctx):
    for i in range(int(request)):
        if not ctx.is_active():
            cancelled.append("server_stream")
            return
        yield str(i).encode()
        time.sleep(0.01)


def bidi(requests, ctx):
    for m in requests:
        yield m.upper()


def slow(request, ctx):
    ended = threading.Event()
    ctx.add_callback(ended.set)
    if not ended.wait(10):
        return b"finished"
    cancelled.append("slow")
    return b""


def fail(request, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such widget")


def stats(request, ctx):
    return json.dumps({"cancelled": cancelled}).encode()


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Stats": grpc.unary_unary_rpc_method_handler(stats),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    # Ends with its parent: the test closes our stdin.
    sys.stdin.read()
    server.stop(0)


def status(e):
    return {"code": e.code().name, "details": e.details(), "trailers": dict(e.trailing_metadata() or ())}


def client(target, token, forbidden_tenant):
    out = {}
    auth = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
        r = check(health_pb2.HealthCheckRequest(), metadata=auth, timeout=5)
        out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        for name, md in (("no_token", ()), ("bad_token", (("authorization", "Bearer not.a.jwt"),)),
                         ("forbidden_tenant", auth + (("x-tenant-id", forbidden_tenant),))):
            try:
                check(health_pb2.HealthCheckRequest(), metadata=md, timeout=5)
                out[name] = {"code": "OK"}
            except grpc.RpcError as e:
                out[name] = status(e)

        unary_call = ch.unary_unary(f"/{SERVICE}/Unary")
        resp, call = unary_call.with_call(b"hello", metadata=auth, timeout=5)
        out["unary"] = json.loads(resp)
        out["unary_trailers"] = dict(call.trailing_metadata())

        out["client_stream"] = ch.stream_unary(f"/{SERVICE}/ClientStream")(
            iter([b"a", b"b", b"c"]), metadata=auth, timeout=5).decode()
        out["server_stream"] = [m.decode() for m in ch.unary_stream(f"/{SERVICE}/ServerStream")(
            b"5", metadata=auth, timeout=5)]
        out["bidi"] = [m.decode() for m in ch.stream_stream(f"/{SERVICE}/Bidi")(
            iter([b"x", b"y"]), metadata=auth, timeout=5)]
        try:
            ch.unary_unary(f"/{SERVICE}/Fail")(b"", metadata=auth, timeout=5)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = status(e)

        # A deadline the upstream cannot meet: the client gives up, and the upstream sees the call end.
        try:
            ch.unary_unary(f"/{SERVICE}/Slow")(b"", metadata=auth, timeout=0.5)
            out["deadline"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["deadline"] = status(e)
        # A cancelled server stream: the client stops after the first message.
        stream = ch.unary_stream(f"/{SERVICE}/ServerStream")(b"1000", metadata=auth, timeout=10)
        next(stream)
        stream.cancel()
        # Ask until the server has seen both calls end (at most 10 s): how fast depends on the machine.
        deadline = time.monotonic() + 10
        while True:
            out["stats"] = json.loads(ch.unary_unary(f"/{SERVICE}/Stats")(b"", metadata=auth, timeout=5))
            seen = set(out["stats"]["cancelled"])
            if {"slow", "server_stream"} <= seen or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        client(sys.argv[2], sys.argv[3], sys.argv[4])
