"""``nri_plugin.health``: the HTTP answers of /readyz and /healthz, and the listener itself."""

from __future__ import annotations

import asyncio

from nri_plugin.health import HealthServer, Readiness, answer


def _status(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_readyz_follows_readiness_and_healthz_is_always_ok() -> None:
    down = Readiness(False, "not registered with the runtime (reconnecting)")
    assert _status(answer("GET /readyz HTTP/1.1", lambda: down)) == (503, down.reason + "\n")
    assert _status(answer("GET /readyz HTTP/1.1", lambda: Readiness(True, "ready"))) == (200, "ready\n")
    assert _status(answer("GET /healthz HTTP/1.0", lambda: down)) == (200, "ok\n")
    assert _status(answer("GET /readyz?verbose HTTP/1.1", lambda: down))[0] == 503


def test_other_paths_methods_and_garbage() -> None:
    ok = lambda: Readiness(True, "ready")  # noqa: E731
    assert _status(answer("GET /metrics HTTP/1.1", ok))[0] == 404
    assert _status(answer("POST /readyz HTTP/1.1", ok))[0] == 405
    assert _status(answer("hello", ok))[0] == 400
    head = answer("HEAD /healthz HTTP/1.1", ok)
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 3" in head


def test_server_answers_over_tcp() -> None:
    async def main() -> tuple[bytes, bytes]:
        state = [Readiness(False, "connecting")]
        server = HealthServer("127.0.0.1:0", lambda: state[0])
        listening = await server.start()
        port = int(listening.rsplit(":", 1)[1])
        out = []
        for path in ("/readyz", "/healthz"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out.append(await reader.read())
            writer.close()
            await writer.wait_closed()
        await server.close()
        assert server.listening == ""
        return out[0], out[1]

    ready, health = asyncio.run(main())
    assert _status(ready) == (503, "connecting\n")
    assert _status(health) == (200, "ok\n")
