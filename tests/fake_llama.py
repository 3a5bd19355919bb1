"""A fake llama-server on loopback: faults a real one will not produce on demand, and benchmarks.

It speaks HTTP/1.1 with keep-alive, as llama-server does: a client keeps its connections and
sends request after request on them (a benchmark that opened a connection per request would
time connects, not the daemon). An exchange cut short (a hang, a drip, a client gone) closes
its connection, as a real server's would be closed.
"""

from __future__ import annotations

import json
import math
import re
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prng_daemon.config import Config, parse_config
from prng_daemon.handlers.decide.prompt import FINDINGS

MODES = (
    "ok", "garbage", "unexplained", "http500", "hang", "loading", "bad_body", "drip", "chunked",
    "huge", "not_http",
)  # fmt: skip
ACTIONS = ("proceed", "retry", "escalate")
CHOSEN_PROB = 0.8
"""In "ok" mode the first letter of the decision (or of its finding) gets this probability, the
other actions' first letters (findings) 0.1 and 0.05, in ACTIONS order."""
LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
CLOSING_SECONDS = 0.3
"""How long an idle connection takes to close once `idle_close` has passed (see FakeLlama)."""


def _chunks(text: str) -> list[str]:
    # About four characters a token, like a real BPE vocabulary on English text.
    return [text[i : i + 4] for i in range(0, len(text), 4)] or [""]


def _probabilities(content: str, decision: str, n_probs: int) -> list[dict[str, Any]]:
    """Byte-level tokens for `content`, the decision value's first letter uncertain."""
    first = content.find(decision) if decision else -1
    out = []
    for i, char in enumerate(content):
        if i == first:
            others = [a[0] for a in ACTIONS if a != decision]
            alternatives = [(char, CHOSEN_PROB), (others[0], 0.1), (others[1], 0.05)]
        else:
            alternatives = [(char, 0.99)]
        top = [
            {"id": ord(t), "token": t, "bytes": list(t.encode()), "logprob": math.log(p)}
            for t, p in alternatives[:n_probs]
        ]
        out.append({**top[0], "top_logprobs": top})
    return out


class FakeLlama:
    """`with FakeLlama() as fake:` serves /health, /completion and /v1/chat/completions on
    `fake.url` until exit.

    Set `.mode` (one of MODES), `.latency` (seconds per /completion), `.slots` (completions served
    at once, the rest wait, like --parallel), `.decision` and `.confidence` (what "ok" answers).
    "drip" answers like "ok", one byte every `.drip_seconds`: each read is quick, the whole slow.
    "chunked" answers like "ok" in chunked transfer encoding, a few bytes a chunk. "huge" sends
    a body of 4 GiB, as fast as the client reads it. "not_http" answers bytes that are not HTTP.

    `.idle_close` (seconds, None: never) closes a kept-alive connection that waited that long for
    its next request, as llama-server (cpp-httplib) does after 5 s. A request that reaches the
    server while it closes is dropped unread: the race a client meets when it sends on a
    connection at that instant. A real server closes within microseconds; this one takes
    CLOSING_SECONDS, so that a test can land a request in that window.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.latency = 0.0
        self.drip_seconds = 2.0
        self.slots: int | None = None
        self.idle_close: float | None = None
        self.decision = "proceed"
        self.confidence = "high"
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        """The Authorization header of every request, in order, None where there was none."""
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._busy = 0
        self._last_prompt = ""
        self._connections: set[socket.socket] = set()
        self.connections = 0
        """TCP connections accepted so far: a client that keeps its connection opens one."""
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # Request threads are joined on close; everything that waits also watches `_stopping`.
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-llama"
        )
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeLlama:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        with self._lock:
            self._slot_free.notify_all()
        # Kept-alive connections wait in a read for the client's next request: end them, or
        # the join of their threads below waits for every client to hang up.
        self.hang_up()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def hang_up(self) -> None:
        """Close every connection now open, as a server restarting or timing out idle
        connections does; `open_connections` is 0 once their threads are done."""
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
            disable_nagle_algorithm = True  # headers and body are two writes: send both now

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake.connections += 1
                    fake._connections.add(self.connection)
                    if fake._stopping.is_set():  # accepted after __exit__ ended the others
                        self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def handle_one_request(self) -> None:
                idle = fake.idle_close
                if idle is not None and not select.select([self.connection], [], [], idle)[0]:
                    fake._stopping.wait(CLOSING_SECONDS)
                    self.close_connection = True
                    return
                super().handle_one_request()

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                if parsed:
                    with fake._lock:
                        fake.authorizations.append(self.headers.get("Authorization"))
                return parsed

            def do_GET(self) -> None:
                if self.path != "/health":
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})
                elif fake.mode == "loading":
                    self._send(503, LOADING_BODY)
                else:
                    self._send(200, {"status": "ok"})

            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                except ValueError:
                    self.close_connection = True  # a cut-off body: the client went away (kill -9)
                    return
                with fake._lock:
                    fake.requests.append(body)
                if fake.mode == "loading":
                    self._send(503, LOADING_BODY)
                    return
                if not fake._take_slot():
                    self.close_connection = True  # stopping: no answer
                    return
                try:
                    fake._stopping.wait(fake.latency)
                    if fake.mode == "hang":
                        fake._stopping.wait()
                        self.close_connection = True
                    elif fake.mode == "http500":
                        self._send(500, {"error": {"code": 500, "message": "fake failure"}})
                    elif fake.mode == "bad_body":
                        self._send_raw(200, b"<html>not json")
                    elif fake.mode == "drip":
                        self._drip(json.dumps(fake._completion(body)).encode())
                    elif fake.mode == "chunked":
                        self._chunked(json.dumps(fake._completion(body)).encode())
                    elif fake.mode == "huge":
                        self._huge()
                    elif fake.mode == "not_http":
                        self.close_connection = True
                        self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                    elif self.path == "/v1/chat/completions":
                        self._send(200, fake._chat(body))
                    else:
                        self._send(200, fake._completion(body))
                finally:
                    fake._release_slot()

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                self._send_raw(status, json.dumps(payload).encode())

            def _drip(self, data: bytes) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        if fake._stopping.wait(fake.drip_seconds):
                            self.close_connection = True
                            return
                except OSError:
                    self.close_connection = True  # the client gave up: what the test wants

            def _chunked(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(data), 100):
                    piece = data[i : i + 100]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            def _huge(self) -> None:
                self.close_connection = True
                block = b" " * (1 << 20)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(1 << 32))
                    self.end_headers()
                    for _ in range(1 << 12):
                        if fake._stopping.is_set():
                            return
                        self.wfile.write(block)
                except OSError:
                    pass  # the client stopped reading: what the test wants

            def _send_raw(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    self.close_connection = True  # the client gave up (a timeout test)

        return Handler

    def _take_slot(self) -> bool:
        with self._lock:
            while self.slots is not None and self._busy >= self.slots:
                if self._stopping.is_set():
                    return False
                self._slot_free.wait()
            self._busy += 1
            return True

    def _release_slot(self) -> None:
        with self._lock:
            self._busy -= 1
            self._slot_free.notify()

    def _content(self) -> str:
        if self.mode == "garbage":
            return '{"decision": "proceed", "confid'
        answer = {"decision": self.decision, "confidence": self.confidence, "reasoning": "fake"}
        return json.dumps(answer)

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI-style answer llama-server gives, with its `timings` and `logprobs`.

        A last assistant turn is continued, as llama-server does: the decision after the
        daemon's `{"decision": "`, or, when the grammar asks for a reasoning, the confidence
        word and reasoning ("unexplained": a cut-off one). "garbage": no action at all.
        """
        messages = body.get("messages", [])
        prefill = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        grammar = str(body.get("grammar", ""))
        top: list[dict[str, Any]] = []
        if "reasoning" in grammar:
            written = f'{self.confidence}", "reasoning": "fake"}}'
            if self.mode == "unexplained":
                written = written[:-2]
        else:
            written, top = self._finding(re.findall(r'"(\w+)"', grammar))
        native = self._completion({**body, "prompt": json.dumps(messages)}, written)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": prefill + written},
        }
        if body.get("logprobs"):
            tokens = _probabilities(written, "", int(body["top_logprobs"]))
            if top:
                tokens[0] = {**top[0], "top_logprobs": top[: int(body["top_logprobs"])]}
            choice["logprobs"] = {"content": tokens}
        return {
            "object": "chat.completion",
            "model": "fake.gguf",
            "choices": [choice],
            "usage": {
                "prompt_tokens": native["tokens_evaluated"],
                "completion_tokens": native["tokens_predicted"],
                "total_tokens": native["tokens_evaluated"] + native["tokens_predicted"],
            },
            "timings": native["timings"],
        }

    def _finding(self, words: list[str]) -> tuple[str, list[dict[str, Any]]]:
        """The first open finding leading to `.decision` (its first letter CHOSEN_PROB likely,
        the first finding of each other action 0.1 and 0.05), or "maybe" when none does."""
        chosen = [w for w in words if FINDINGS[w][0] == self.decision]
        if self.mode == "garbage" or not chosen:
            return "maybe", []
        others = [next(w for w in words if FINDINGS[w][0] == a) for a in ACTIONS
                  if a != self.decision and any(FINDINGS[w][0] == a for w in words)]  # fmt: skip
        top = [
            {"id": ord(w[0]), "token": w[0], "bytes": list(w[0].encode()), "logprob": math.log(p)}
            for w, p in zip([chosen[0], *others], (CHOSEN_PROB, 0.1, 0.05), strict=False)
        ]
        return f'{chosen[0]}"', top

    def _completion(self, body: dict[str, Any], content: str | None = None) -> dict[str, Any]:
        prompt = str(body.get("prompt", ""))
        content = self._content() if content is None else content
        with self._lock:
            shared = 0
            for old, new in zip(_chunks(self._last_prompt), _chunks(prompt), strict=False):
                if old != new:
                    break
                shared += 1
            self._last_prompt = prompt
        evaluated = len(_chunks(prompt))
        # Like llama-server: the last prompt token is always evaluated again.
        cached = min(shared, evaluated - 1)
        predicted = len(content)
        answer: dict[str, Any] = {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": "fake.gguf",
            "tokens_predicted": predicted,
            "tokens_evaluated": evaluated,
            "generation_settings": {"n_predict": body.get("n_predict", -1)},
            "prompt": prompt,
            "has_new_line": False,
            "truncated": False,
            "stop_type": "eos",
            "stopping_word": "",
            "tokens_cached": evaluated + predicted,
            "timings": {
                "cache_n": cached,
                "prompt_n": evaluated - cached,
                "prompt_ms": 0.03 * (evaluated - cached),
                "predicted_n": predicted,
                "predicted_ms": 0.1 * predicted,
            },
        }
        n_probs = int(body.get("n_probs", 0))
        if n_probs > 0:
            answer["completion_probabilities"] = _probabilities(content, self.decision, n_probs)
        return answer


STATE_DIR: Path | None = None
"""The `daemon.state_dir` of `llm_config`'s configs, set for the session by conftest: the
default, /var/lib/prng-llm-daemon, is the machine's (a daemon that ran there left its llm.key)."""


def llm_config(orchestrator_port: int, math_port: int, **sections: dict[str, Any]) -> Config:
    """A Config whose two servers are on these loopback ports; `sections` overrides, e.g. policy.
    Its state dir is the session's (`STATE_DIR`), never the machine's."""
    assert STATE_DIR is not None, "set by conftest"
    doc: dict[str, Any] = {
        "orchestrator": {"model": "orchestrator-model.gguf", "port": orchestrator_port},
        "math": {"model": "math-model.gguf", "port": math_port},
        "daemon": {"state_dir": str(STATE_DIR)},
        **sections,
    }
    return parse_config(json.dumps(doc))
