"""`alignpipe serve`: an OpenAI-compatible HTTP API (Starlette/FastAPI under uvicorn) over engine.py's
models: GET /v1/models, POST /v1/chat/completions (streamed as server-sent events with `stream: true`)
and POST /v1/completions. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime

import json
import secrets
import socket
import threading
import time

from alignpipe.serving import access, engine
from alignpipe.serving.engine import Job, ServedModel


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- reading a request ------------------------------------------------------------------------------


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} from {low:g} to {high:g}, got {value!r}", key)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _content(message: dict, n: int):
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{n}].content: only text parts are supported", f"messages[{n}].content")
        return "".join(p["text"] for p in content)
    if content is None and message.get("tool_calls"):
        return ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{n}].content must be a string", f"messages[{n}].content")
    return content


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{n}].role must be system, user, assistant or tool", f"messages[{n}].role")
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, n)}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def _tools(body: dict, served: ServedModel) -> list[dict] | None:
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                              and isinstance(t.get("function"), dict) for t in tools):
        raise ApiError(400, "tools must be a list of {type: function, function: {...}}", "tools")
    if not served.has_tools:
        raise ApiError(400, f"model {served.name} was trained on a chat template without tools", "tools")
    if body.get("tool_choice") not in (None, "auto"):
        raise ApiError(400, "tool_choice: only auto and none are supported", "tool_choice")
    return tools


def read_job(body, served: ServedModel, chat: bool) -> Job:
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if chat:
        messages, prompt = _messages(body), None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        messages = None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Job(messages=messages, prompt=prompt,
               max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 20, integer=True),
               temperature=float(_number(body, "temperature", 1.0, 0, 2)), top_p=float(_number(body, "top_p", 1.0, 0, 1)),
               stop=_stops(body), seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
               tools=_tools(body, served) if chat else None)


# --- answering -------------------------------------------------------------------------------------


class Api:
    def __init__(self, models: list[ServedModel], host: str, api_key: str | None) -> None:
        self.models = {m.name: m for m in models}
        self.host, self.api_key = host, api_key
        self.created = int(time.time())

    def model(self, body) -> ServedModel:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = body.get("model")
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served here: {', '.join(self.models)}", "model",
                           "model_not_found")
        return self.models[name]

    def list_models(self) -> dict:
        return {"object": "list", "data": [self.card(n) for n in self.models]}

    def card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "alignpipe"}

    def prepared(self, body, chat: bool):
        served = self.model(body)
        job = read_job(body, served, chat)
        ids = engine.prompt_ids(served, job)
        try:
            budget = engine.token_budget(served, len(ids), job.max_tokens)
        except engine.PromptTooLong as err:
            raise ApiError(400, str(err), "max_tokens" if job.max_tokens else "messages",
                           "context_length_exceeded") from None
        return served, job, ids, budget

    def complete(self, served: ServedModel, job: Job, ids: list[int], budget: int) -> engine.Result:
        tokens = engine.start(served, job, ids, budget, threading.Event())
        reply = []
        while (t := tokens.get()) is not engine.DONE:
            if isinstance(t, Exception):
                raise ApiError(500, f"generation failed: {type(t).__name__}: {t}", kind="server_error")
            reply.append(t)
        return engine.finish(served, job, len(ids), reply, budget)

    def stream(self, served: ServedModel, job: Job, ids: list[int], budget: int, chat: bool):
        """Server-sent events: one chunk per released piece of text, the last with finish_reason, then [DONE]."""
        ident, created = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), int(time.time())

        def event(delta: dict | str, reason: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            data = {"id": ident, "object": obj, "created": created, "model": served.name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        cancel = threading.Event()
        tokens = engine.start(served, job, ids, budget, cancel)
        text = engine.StreamText(served, job)
        reply: list[int] = []
        try:
            if chat:
                yield event({"role": "assistant", "content": ""})
            while (t := tokens.get()) is not engine.DONE:
                if isinstance(t, Exception):
                    err = ApiError(500, f"generation failed: {type(t).__name__}: {t}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                reply.append(t)
                if new := text.more(reply):
                    yield event({"content": new} if chat else new)
            result = engine.finish(served, job, len(ids), reply, budget)
            rest = text.rest(result.text)
            if rest:
                yield event({"content": rest} if chat else rest)
            if result.tool_calls:
                yield event({"tool_calls": [{"index": i, **c} for i, c in enumerate(result.tool_calls)]})
            yield event({} if chat else "", result.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # the client left (or we are done): stop generating

    @staticmethod
    def usage(r: engine.Result) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def chat_body(self, served: ServedModel, r: engine.Result) -> dict:
        message = {"role": "assistant", "content": r.text}
        if r.tool_calls:
            message["tool_calls"] = r.tool_calls
        return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
                "model": served.name, "usage": self.usage(r),
                "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}]}

    def completion_body(self, served: ServedModel, r: engine.Result) -> dict:
        return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
                "model": served.name, "usage": self.usage(r),
                "choices": [{"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}]}


def build_app(api: Api):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="alignpipe serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = access.refusal(api.host, api.api_key, request.headers.get("host"),
                                 request.headers.get("authorization"))
        if refused:
            status, message = refused
            return error(ApiError(status, message, code="invalid_api_key" if status == 401 else "forbidden_host",
                                  kind="authentication_error" if status == 401 else "permission_error"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))

    async def body_of(request: Request):
        try:
            return json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not JSON: {err}") from None

    async def answer(request: Request, chat: bool):
        body = await body_of(request)
        served, job, ids, budget = await run_in_threadpool(api.prepared, body, chat)
        if body.get("stream"):
            return StreamingResponse(api.stream(served, job, ids, budget, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await run_in_threadpool(api.complete, served, job, ids, budget)
        return JSONResponse(api.chat_body(served, result) if chat else api.completion_body(served, result))

    @app.get("/v1/models")
    async def models():
        return api.list_models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in api.models:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return api.card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def run(models: list[ServedModel], host: str, port: int, api_key: str | None) -> None:
    """Serve until interrupted; prints the base URL (with the port actually bound: --port 0 picks one)."""
    import uvicorn

    try:
        sock = listening_socket(host, port)
    except OSError as err:
        from alignpipe.errors import AlignpipeError

        raise AlignpipeError(f"cannot listen on {host}:{port}: {err.strerror}", key="--port",
                             fix="choose another --port (0: any free one)") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    app = build_app(Api(models, host, api_key))
    print(f"[alignpipe] serving {', '.join(m.name for m in models)} at http://{shown}:{bound}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
