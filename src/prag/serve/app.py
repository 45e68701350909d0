"""`prag serve`: the HTTP routes, their request and response models, and the middleware around them.

    GET  /healthz                  200 once the service can answer (no key needed)
    GET  /                         the page: ask in several modes side by side, add a document (no key)
    POST /v1/answer                {"question", "mode", "top_k"} -> answer, passages, timings
    POST /v1/chat/completions      OpenAI's chat API; `model` names the mode
    GET  /v1/models                the modes, as OpenAI models
    POST /v1/documents             {"documents": [{"id"?, "title", "text"}]} -> 202, logged durably first
    GET  /v1/documents/{id}        title and parameterization status
    GET  /metrics                  Prometheus text format
    GET  /openapi.json             the schema of all of the above

Every error is `{"error": {"message", "type", "param"}}` (OpenAI's shape) whose message starts with
the field it is about; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline import ALL_MODES, MAX_TOP_K, Answer, check_question
from .ingest import MAX_DOCUMENTS_PER_REQUEST, DuplicateDocument
from .service import Service

STATIC = resources.files("prag") / "serve" / "static"
PUBLIC_PATHS = {"/healthz", "/", "/favicon.ico"}


class ApiError(Exception):
    def __init__(self, status: int, param: str, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.message, self.kind = status, param, message, kind


def error_body(status: int, param: str | None, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# -- request and response models --------------------------------------------------------------------------


def _check_mode(mode: str) -> str:
    if mode not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    return mode


def _check_top_k(top_k: int | None) -> int | None:
    if top_k is not None:
        check_question("?", top_k)  # the library's own bounds on top_k
    return top_k


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(description="the question (at most 2000 characters)")
    mode: StrictStr = Field(
        "prag",
        description="closed, rag, prag, combine, dyprag, dyprag-combine (these two need a trained translator), "
        "or a control: prag-unrelated, combine-unrelated, dyprag-unrelated, dyprag-combine-unrelated",
    )
    top_k: StrictInt | None = Field(None, description=f"passages retrieved, 1 to {MAX_TOP_K} (default: the config's)")

    @field_validator("question")
    @classmethod
    def _question(cls, question: str) -> str:
        check_question(question)
        return question

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k: int | None) -> int | None:
        return _check_top_k(top_k)

    @field_validator("mode")
    @classmethod
    def _mode(cls, mode: str) -> str:
        return _check_mode(mode)


class PassageOut(BaseModel):
    id: str
    title: str
    score: float


class AnswerResponse(BaseModel):
    answer: str = Field(description="the short answer")
    text: str = Field(description="the whole generation after the lead-in")
    mode: str
    passages: list[PassageOut] = Field(description="retrieved (in the prompt in rag and combine)")
    lora_documents: list[str] = Field(description="ids of the documents whose LoRAs were merged")
    missing_adapters: list[str] = Field(
        description="ids of documents whose LoRAs should have been merged but were not ready in time (or failed)"
    )
    timings_ms: dict[str, float]
    batch_size: int = Field(description="questions generated together with this one")


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = Field(None, description="default: a hash of title and text")
    title: StrictStr
    text: StrictStr


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS_PER_REQUEST)


class DocumentStatus(BaseModel):
    id: str
    title: str
    status: str = Field(description="queued, building, ready, failed; not_built: a corpus passage not retrieved yet")
    source: str = Field(description="ingested, or corpus")
    index: str = Field(description="main, or delta (searchable, not yet merged into the main index)")
    error: str | None = None


class DocumentsAccepted(BaseModel):
    ids: list[str]
    documents: list[DocumentStatus]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ...: accepted, the config decides
    model: StrictStr = Field(description="the mode: closed, rag, prag, combine (or a control)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    top_k: StrictInt | None = None

    @field_validator("model")
    @classmethod
    def _mode(cls, mode: str) -> str:
        return _check_mode(mode)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, top_k: int | None) -> int | None:
        return _check_top_k(top_k)

    def question(self) -> str:
        for i in range(len(self.messages) - 1, -1, -1):
            message = self.messages[i]
            if message.role == "user":
                content = message.content
                if isinstance(content, list):  # content parts: the text ones
                    content = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
                try:
                    check_question(content)
                    return content
                except ValueError as error:
                    raise ApiError(422, f"messages[{i}].content", f"messages[{i}].content: {error}") from None
        raise ApiError(422, "messages", "messages: no message with role 'user'")


# -- middleware --------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self, service: Service):
        self.registry = registry = CollectorRegistry()
        labels = ["endpoint", "mode", "code"]
        self.requests = Counter(
            "prag_requests", "HTTP requests by endpoint, mode and status", labels, registry=registry
        )
        self.errors = Counter("prag_request_errors", "HTTP requests answered 4xx or 5xx", labels, registry=registry)
        self.latency = Histogram(
            "prag_request_latency_seconds",
            "HTTP request latency",
            ["endpoint", "mode"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.batch = Histogram(
            "prag_batch_size", "questions per batched generation", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.built = Counter("prag_documents_built", "documents parameterized by the builder", registry=registry)
        self.failed = Counter("prag_documents_failed", "documents whose parameterization failed", registry=registry)
        self.ingested = Counter(
            "prag_documents_ingested", "documents accepted by POST /v1/documents", registry=registry
        )
        gauges = {
            "prag_answer_queue_depth": ("questions waiting for a batch", lambda: service.batcher.queue_depth),
            "prag_answers_waiting_for_documents": (
                "questions waiting for their documents' adapters",
                lambda: service.batcher.waiting_for_documents,
            ),
            "prag_build_queue_depth": ("documents queued for parameterization", lambda: service.builder.queue_depth),
            "prag_index_delta_documents": (
                "documents searchable but not yet merged into the main index",
                lambda: len(service.live.added) if service.live else 0,
            ),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(value)
        service.batch_hooks.append(lambda size, seconds: self.batch.observe(size))
        service.built_hooks.append(lambda ready, failed: (self.built.inc(ready), self.failed.inc(failed)))

    def observe(self, endpoint: str, mode: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, mode, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, mode, str(code)).inc()
        self.latency.labels(endpoint, mode).observe(seconds)


class Middleware:
    """Around every request: the latency and status metrics, the API key, and the body size limit
    (checked before the body is parsed, so a request without the key never gets further)."""

    def __init__(self, app, service: Service, metrics: Metrics, routes: list):
        self.app, self.service, self.metrics, self.routes = app, service, metrics, routes
        self.key = service.settings.api_key
        self.max_body = service.settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            route = scope.get("route") or self._route(scope)
            endpoint = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/") else "other")
            mode = (scope.get("state") or {}).get("mode", "")
            self.metrics.observe(endpoint, mode, status[0], time.perf_counter() - start)

    def _route(self, scope):
        """The route a request was for when it never reached routing (a 401, a 413)."""
        from starlette.routing import Match

        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route
        return None

    async def _guarded(self, scope, receive, send):
        path = scope["path"]
        if scope["method"] == "POST":  # JSON is all the API takes: `curl -d '{...}'` needs no Content-Type
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        if self.key is not None and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
                message = "authorization: missing or wrong API key; send the header 'Authorization: Bearer KEY'"
                body = error_body(401, "authorization", message, "authentication_error")
                response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body without a length
                    raise StarletteHTTPException(413, f"body: larger than {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _too_large(self, scope, receive, send):
        body = error_body(413, "body", f"body: larger than {self.max_body} bytes")
        await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)


# -- the app -----------------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="prag",
        description="Parametric RAG as a service: documents as LoRAs, merged into the model per question.",
        version="0.1.0",
        openapi_url=None,  # served below, behind the key
        docs_url=None,
        redoc_url=None,
    )
    metrics = Metrics(service)
    app.add_middleware(Middleware, service=service, metrics=metrics, routes=app.router.routes)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    _errors(app)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "model": service.pipeline.config.model.name, "passages": len(service.live)}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/answer", tags=["answer"])
    async def answer(body: AnswerRequest, request: Request) -> AnswerResponse:
        request.state.mode = body.mode
        start = time.perf_counter()
        result = await service.answer(body.question, body.mode, body.top_k)
        return answer_response(result, time.perf_counter() - start)

    @app.get("/v1/models", tags=["openai"])
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "prag"} for m in ALL_MODES],
        }

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat(body: ChatRequest, request: Request):
        request.state.mode = body.model
        question = body.question()
        start = time.perf_counter()
        result = await service.answer(question, body.model, body.top_k)
        reply = answer_response(result, time.perf_counter() - start)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prag = {"passages": [p.model_dump() for p in reply.passages], "timings_ms": reply.timings_ms}
        if body.stream:  # the whole answer in one chunk (a batched generation does not stream rows)
            return StreamingResponse(
                _chunks(completion_id, created, body.model, reply.answer, prag), media_type="text/event-stream"
            )
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.answer},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.new_tokens,
                "total_tokens": result.prompt_tokens + result.new_tokens,
            },
            "prag": prag,
        }

    @app.post("/v1/documents", status_code=202, tags=["documents"])
    def add_documents(body: DocumentsRequest) -> DocumentsAccepted:
        try:
            passages = service.add_documents([d.model_dump() for d in body.documents])
        except DuplicateDocument as error:
            raise ApiError(409, _field_of(error), str(error), "conflict") from None
        except ValueError as error:
            raise ApiError(422, _field_of(error), str(error)) from None
        metrics.ingested.inc(len(passages))
        return DocumentsAccepted(
            ids=[p.id for p in passages], documents=[service.document_status(p.id) for p in passages]
        )

    @app.get("/v1/documents/{doc_id:path}", tags=["documents"])
    def document(doc_id: str) -> DocumentStatus:
        status = service.document_status(doc_id)
        if status is None:
            raise ApiError(404, "doc_id", f"doc_id: unknown document id {doc_id!r}", "not_found_error")
        return DocumentStatus(**status)

    return app


def answer_response(answer: Answer, seconds: float) -> AnswerResponse:
    timings = {k: round(v * 1000, 2) for k, v in answer.timings.items() if k != "batch_size"}
    timings["total"] = round(seconds * 1000, 2)
    return AnswerResponse(
        answer=answer.short_answer,
        text=answer.text,
        mode=answer.mode,
        passages=[
            PassageOut(id=p.id, title=p.title, score=s) for p, s in zip(answer.passages, answer.scores, strict=True)
        ],
        lora_documents=[p.id for p in answer.lora_passages if p not in answer.missing],
        missing_adapters=[p.id for p in answer.missing],
        timings_ms=timings,
        batch_size=int(answer.timings.get("batch_size", 1)),
    )


def _chunks(completion_id: str, created: int, model: str, content: str, prag: dict):
    def chunk(delta: dict, finish: str | None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        row = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        return f"data: {json.dumps(row | {'choices': [choice]} | extra)}\n\n"

    yield chunk({"role": "assistant", "content": content}, None)
    yield chunk({}, "stop", prag=prag)
    yield "data: [DONE]\n\n"


def _field_of(error: Exception) -> str:
    """The field a library error message starts with ("documents[0].text: ...")."""
    head = str(error).split(":", 1)[0]
    return head if head and " " not in head else "body"


def _errors(app: FastAPI) -> None:
    """Every error in one shape, naming its field; validation errors are 422 (400 for unparsable JSON)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.status, error.param, error.message, error.kind), error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [part for part in first.get("loc", ()) if part != "body"]
        if isinstance(error.body, dict):  # for the metrics: the mode, when it was a valid one
            mode = error.body.get("mode", error.body.get("model"))
            if isinstance(mode, str) and mode in ALL_MODES:
                request.state.mode = mode
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "not valid JSON")
            return JSONResponse(error_body(400, "body", f"body: malformed JSON ({reason})"), 400)
        field = "body"
        if loc:
            field = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        if first["type"] == "missing" and not loc:
            message = "body: a JSON object is required"
        elif first["type"] == "missing":
            message = f"{field}: required"
        elif first["type"] == "extra_forbidden":
            message = f"{field}: unknown field"
        else:
            message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            if not message.startswith(f"{field}:"):
                message = f"{field}: {message}"
        return JSONResponse(error_body(422, field, message), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = str(error.detail)
        if error.status_code == 404 and detail == "Not Found":
            detail = f"path: no endpoint {request.url.path}"
        elif error.status_code == 405:
            detail = f"method: {request.method} is not allowed on {request.url.path}"
        param = detail.split(":", 1)[0] if ":" in detail else None
        return JSONResponse(error_body(error.status_code, param, detail), error.status_code)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, error: ValueError) -> JSONResponse:
        return JSONResponse(error_body(422, _field_of(error), str(error)), 422)


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Start the service (model, index, builder, batcher), then serve HTTP until interrupted."""
    import uvicorn

    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        service.stop()
