"""A minimal ingestion sink for the benchmarks: the fastest server a client could meet.

    python benchmarks/sink.py [--port 0]

Prints its URL on the first line, then ``accepted=N`` once per request (as the devserver
does, so ``ServerProcess`` reads both the same way). It keeps connections alive, counts
the events of a batch by their ``$message_id`` without parsing the JSON, and answers 202.
It checks nothing: the devserver is the strict one; this one measures how fast the client
can go when the server costs (almost) nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading

_MARKER = b'"$message_id"'


def _reply(accepted: int) -> bytes:
    body = json.dumps({"accepted": accepted, "rejected": 0}).encode()
    return (
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _serve(conn: socket.socket, out: threading.Lock) -> None:
    buffer = b""
    with conn:
        while True:
            head_end = buffer.find(b"\r\n\r\n")
            while head_end < 0:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                head_end = buffer.find(b"\r\n\r\n")
            head = buffer[:head_end].lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    length = int(value)
            need = head_end + 4 + length
            parts = [buffer]
            size = len(buffer)
            while size < need:
                chunk = conn.recv(max(65536, need - size))
                if not chunk:
                    return
                parts.append(chunk)
                size += len(chunk)
            buffer = b"".join(parts)
            body, buffer = buffer[head_end + 4 : need], buffer[need:]
            accepted = body.count(_MARKER)
            conn.sendall(_reply(accepted))
            with out:
                sys.stdout.write(f"accepted={accepted}\n")
                sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", args.port))
    out = threading.Lock()
    sys.stdout.write(f"http://127.0.0.1:{listener.getsockname()[1]}\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve, args=(conn, out), daemon=True).start()


if __name__ == "__main__":
    main()
