"""A tiny OpenAI-compatible chat server for tests, in a thread of the test process.

``POST /v1/chat/completions`` answers like a model that always uses its
calculator: when the last message is the user's and holds an arithmetic
expression, it calls the ``calculator`` tool with that expression; when the
last message is a tool result, it answers ``"The answer is <result>"``.
A test scripts other answers per model (:meth:`OpenAIStub.script`);
:class:`CalcScenario` scripts the calculator agent's model and a critic for prompt optimization.
Every request is recorded (model, body, Authorization header) for assertions.

No pytest here (the ``openai_stub`` fixture is in ``tests/conftest.py``): ``algorithms/`` and
``benchmarks/`` start this server too.

Token usage counts words (prompt: the messages' words, one more per message;
completion: the answer's or the tool call's words). ``"stream": true`` answers
with server-sent chunks, ending with a usage chunk when
``stream_options.include_usage`` asks for it.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lightning_queue.training.critic import CRITIQUE_INSTRUCTIONS

# The longest run of numbers, operators and parentheses holding at least one operator.
_EXPRESSION = re.compile(r"[-(]*\s*\d[\d.\s()+\-*/%]*[+\-*/%][\d.\s()+\-*/%]*\d\s*\)*")


def extract_expression(text: str) -> str | None:
    """``"What is 12 * (3 + 4)?"`` -> ``"12 * (3 + 4)"``; None when there is no arithmetic."""
    found = [m.group(0).strip() for m in _EXPRESSION.finditer(text)]
    if not found:
        return None
    expression = max(found, key=len)
    # Drop parentheses that the match cut out of balance ("(3 + 4" or "3 + 4)").
    while expression.count("(") > expression.count(")") and expression.startswith("("):
        expression = expression[1:].strip()
    while expression.count(")") > expression.count("(") and expression.endswith(")"):
        expression = expression[:-1].strip()
    return expression


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    authorization: str | None
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        return self.body.get("model")


class OpenAIStub:
    """Start with :meth:`start` (or ``with OpenAIStub() as stub``); point an LLM at :attr:`endpoint`.

    ``fail_status`` makes every request answer with that HTTP status.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.fail_status: int | None = None
        self.scripts: dict[str, Answer] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def script(self, model: str, answer: Answer) -> None:
        """Answer the requests naming ``model`` with ``answer(body)``: a string is the assistant's
        text, a dict the whole assistant message (e.g. with ``tool_calls``), ``None`` the default
        calculator behaviour. Called in the stub's threads, one per request."""
        self.scripts[model] = answer

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the stub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as LLM servers do, and no Nagle delay between the headers and the body.
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._reply(400, {"error": {"message": "the body is not JSON"}})
                with stub._lock:
                    stub.requests.append(RecordedRequest(self.path, self.headers.get("Authorization"), body))
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                if stub.fail_status is not None:
                    return self._reply(stub.fail_status, {"error": {"message": "the stub was told to fail"}})
                scripted = stub.scripts.get(str(body.get("model")))
                try:
                    answer = scripted(body) if scripted is not None else None
                except Exception as exc:  # a broken script is the test's bug: say so in the reply
                    return self._reply(500, {"error": {"message": f"the script raised {exc!r}"}})
                if body.get("stream"):
                    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                    return self._stream(completion(body, answer), include_usage)
                return self._reply(200, completion(body, answer))

            def _stream(self, answer: dict[str, Any], include_usage: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in stream_chunks(answer, include_usage):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-stub", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/chat/completions"]


Answer = Callable[[dict[str, Any]], "str | dict[str, Any] | None"]
"""A scripted model: the request body -> the assistant's text, its whole message, or None (default)."""


def last_user_text(body: dict[str, Any]) -> str:
    """The content of the last user message of a chat request (what a script usually looks at)."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def completion(body: dict[str, Any], answer: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """The stub model's answer to one chat request (``answer``: what a script said instead)."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    message: dict[str, Any]
    if isinstance(answer, dict):
        message = {"role": "assistant", **answer}
    elif isinstance(answer, str):
        message = {"role": "assistant", "content": answer}
    elif last.get("role") == "tool":
        message = {"role": "assistant", "content": f"The answer is {last.get('content')}"}
    elif last.get("role") == "user" and (expression := extract_expression(str(last.get("content") or ""))):
        call = {
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
    else:
        message = {"role": "assistant", "content": "I can only do arithmetic."}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}
        ],
        "usage": usage(messages, message),
    }


class CalcScenario:
    """Two scripted models on a stub, for prompt optimization of ``workers/calc_agent.py``.

    ``calc-model`` uses its calculator (the stub's own behaviour) only when the prompt it is
    given mentions the calculator; otherwise it guesses ``guess``. ``critic-model`` answers a
    critique request (:class:`~lightning_queue.training.Critic`'s first call) with ``critique``,
    and each edit request with the next of ``proposals``, in turn.
    """

    CALC_MODEL = "calc-model"
    CRITIC_MODEL = "critic-model"

    def __init__(self, stub: OpenAIStub, proposals: Sequence[str], critique: str = "- The model guesses the "
                 "numbers. Tell it to use the calculator tool.", guess: str = "I think it is 7.") -> None:
        self.stub = stub
        self.critique = critique
        self.guess = guess
        self.critiques = 0
        self._proposals = itertools.cycle(proposals) if proposals else None
        self._lock = threading.Lock()
        stub.script(self.CALC_MODEL, self.calc)
        stub.script(self.CRITIC_MODEL, self.critic)

    def calc(self, body: dict[str, Any]) -> str | None:
        if body["messages"][-1]["role"] == "tool" or "calculator" in last_user_text(body):
            return None  # call the calculator, then report its result
        return self.guess

    def critic(self, body: dict[str, Any]) -> str:
        with self._lock:
            if body["messages"][0]["content"] == CRITIQUE_INSTRUCTIONS:
                self.critiques += 1
                return self.critique
            if self._proposals is None:
                raise AssertionError("this scenario has no proposals")
            return next(self._proposals)

    def first_turns(self) -> Counter[str]:
        """How often each first model call of a calculator rollout was made (one per rollout run)."""
        return Counter(r.body["messages"][0]["content"] for r in self.stub.chat_requests()
                       if r.model == self.CALC_MODEL and len(r.body["messages"]) == 1)


def _words(value: Any) -> int:
    return len(str(value).split()) if value else 0


def usage(messages: list[dict[str, Any]], message: dict[str, Any]) -> dict[str, int]:
    """Token counts by words (see the module docstring)."""
    prompt = sum(_words(m.get("content")) + 1 for m in messages)
    completion = _words(message.get("content")) + sum(
        _words(c["function"]["arguments"]) for c in message.get("tool_calls") or [])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A completion as the chunks of a stream: the role, the content word by word (or the tool
    calls), the finish reason, and the usage when asked for."""
    choice = answer["choices"][0]
    message = choice["message"]
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"]}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    words = (message.get("content") or "").split(" ")
    deltas += [{"content": w if i == 0 else f" {w}"} for i, w in enumerate(words) if message.get("content")]
    for index, call in enumerate(message.get("tool_calls") or []):
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    return chunks
