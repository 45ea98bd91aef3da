"""python -m rag.serve --file docs/ [--host 127.0.0.1] [--port 8000] [the model and retrieval flags of rag.cli]

A web page and an HTTP API over your documents, with the same models, index and answers as
`python -m rag.cli`:

    GET  /                      the page: documents, upload, ask, the answer streamed, cited passages
    POST /api/ask               {"question": "..."} -> the --json shape of rag.cli
    GET  /api/ask/stream?question=...   server-sent events: queued {"ahead"}, sources, token {"text"}, done | error
    GET  /api/documents         the indexed documents
    POST /api/documents         multipart field "file": store it (named by its sha256) and index it
    GET  /api/health            status, models, chunks, queue length
    GET  /docs, /openapi.json   FastAPI's own API page, its assets served from fastapi-offline (no CDN)

One worker thread runs the LLM (and re-indexing), one request at a time in arrival order; a request
waiting its turn is told how many are ahead, and a client that leaves stops its answer at the next token.
Bound to anything but loopback it needs --api-key (or $TUNERAG_API_KEY); then every /api call needs
`Authorization: Bearer KEY`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and the
# names they use (Request, ...) are imported inside build_app, where strings would not resolve.
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files as package_files
from pathlib import Path, PurePath
from typing import Annotated, Any
from urllib.parse import urlsplit

from rag.cli import HISTORY_TURNS
from rag.config import RagConfig
from tunerag.common import TuneragError, first_line, run_cli, tunerag_home

logger = logging.getLogger(__name__)

# Types the page and the API take; only those tunerag.documents can read are accepted (see upload_suffixes).
UPLOAD_TYPES = (".txt", ".md", ".pdf", ".html", ".htm", ".docx")
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and headers around the file, on top of --max-upload-mb
POLL_S = 0.1  # how often a waiting request looks at its place in line and at its client
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


@dataclass
class ServeConfig(RagConfig):
    """python -m rag.serve --file docs/: a web page and HTTP API over your documents (ask, stream the answer,
    see the cited passages, upload more documents), with the same models and retrieval flags as rag.cli."""

    # rag.cli's one-shot and batch flags mean nothing here: not flags of this command.
    question: str | None = field(default=None, init=False)
    questions: Path | None = field(default=None, init=False)
    json: bool = field(default=False, init=False)
    timings: bool = field(default=False, init=False)

    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to listen on; anything but loopback (127.0.0.1, ::1, localhost) needs --api-key."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "Key every /api call must send as `Authorization: Bearer KEY` (default: $TUNERAG_API_KEY; "
                "the variable keeps it out of the process list)."})
    upload_dir: Path | None = field(default=None, metadata={
        "help": "Where uploaded documents are stored, named by content hash (default: $TUNERAG_HOME/uploads)."})
    max_upload_mb: float = field(default=50.0, metadata={"help": "Largest upload, in MB (2**20 bytes)."})

    def __post_init__(self):
        super().__post_init__()
        if self.api_key is None:
            self.api_key = os.environ.get("TUNERAG_API_KEY") or None
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty; pass a key, or leave it out on loopback")
        if not is_loopback(self.host) and self.api_key is None:
            raise ValueError(f"--host {self.host} is reachable from other machines: set TUNERAG_API_KEY (or pass "
                             "--api-key) so every /api call needs it, or listen on --host 127.0.0.1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535 (got {self.port})")
        if self.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be above 0 (got {self.max_upload_mb:g})")
        self.upload_dir = Path(self.upload_dir) if self.upload_dir is not None else tunerag_home() / "uploads"


def upload_suffixes() -> list[str]:
    """UPLOAD_TYPES that this version of tunerag.documents reads (a file it cannot read is refused on upload)."""
    from tunerag.documents import SUPPORTED_SUFFIXES

    return [s for s in UPLOAD_TYPES if s in SUPPORTED_SUFFIXES]


def store_upload(source, folder: Path, suffix: str, limit: int) -> tuple[Path, int, bool] | None:
    """Copy an uploaded file into `folder` as SHA256{suffix}, never under the client's name; returns
    (path, bytes, whether it is new), or None when it is over `limit` bytes (nothing stays behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            while block := source.read(1 << 20):
                size += len(block)
                if size > limit:
                    return None
                digest.update(block)
                out.write(block)
        path = folder / f"{digest.hexdigest()}{suffix}"
        new = not path.exists()
        os.replace(tmp, path)
        return path, size, new
    finally:
        Path(tmp).unlink(missing_ok=True)


class Server:
    """What the app holds: the Answerer over the current documents, and the line in front of its worker.

    Every request that runs the worker (an answer, or re-indexing after an upload) holds a ticket from
    arrival until its work has really ended, a stopped generation included: `ahead` counts the one running."""

    def __init__(self, cfg: ServeConfig):
        from rag.cli import Answerer

        self.cfg = cfg
        self.models: dict = {}
        self.files: list[Path] = list(cfg.file)
        self.names: dict[str, str] = {}  # stored upload name -> the client's name, for display only
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunerag-worker")
        # Loaded and indexed in the worker thread that answers: torch work in one more thread would bring
        # a second OpenMP team, which halves decoding speed on a 2-core CPU (rag.local_llm).
        self.answerer = self.worker.submit(Answerer, cfg, time.perf_counter(), models=self.models).result()
        self.indexed = self.paths()
        self.tickets: list[object] = []
        self.background: set[asyncio.Task] = set()

    def stop_answer(self) -> None:
        if self.answerer.stop is not None:
            self.answerer.stop.event.set()

    async def run(self, request, work: Callable[[Callable[[str, Any], None]], Any], stoppable: bool = False):
        """Async generator: ("queued", {"ahead": n}) first and whenever n changes, then the (kind, data)
        that `work(emit)` emits from the worker thread, then ("done", what work returned); work's
        exception is raised here. If the client leaves, this ends, the answer is stopped (`stoppable`)
        and the ticket goes once the work has ended."""
        ticket = object()
        self.tickets.append(ticket)
        job = getter = None
        try:
            ahead = None
            while (now := self.tickets.index(ticket)) != ahead:
                ahead = now
                yield "queued", {"ahead": ahead}
                while ahead and self.tickets.index(ticket) == ahead:
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(POLL_S)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            end = object()

            def emit(kind: str, data: Any) -> None:  # called in the worker thread
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))

            def run_work():
                try:
                    return work(emit)
                finally:
                    emit(end, None)

            job = loop.run_in_executor(self.worker, run_work)
            while True:
                getter = getter or asyncio.ensure_future(events.get())
                await asyncio.wait({getter}, timeout=POLL_S)  # not wait_for: a timeout there can drop an item
                if not getter.done():
                    if await request.is_disconnected():
                        return
                    continue
                kind, data = getter.result()
                getter = None
                if kind is end:
                    break
                yield kind, data
            yield "done", await job
        finally:
            if getter is not None:
                getter.cancel()
            if job is None or job.done():
                self.tickets.remove(ticket)
            else:  # the client left, or the server is stopping
                task = asyncio.ensure_future(self.leave_when_done(job, ticket, stoppable))
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def leave_when_done(self, job, ticket, stoppable: bool) -> None:
        # Set again each poll: an answer that had only just started clears the flag once (ready_for_next).
        logger.info("the client left: %s", "stopping its answer" if stoppable else "its work goes on to the end")
        while not job.done():
            if stoppable:
                self.stop_answer()
            await asyncio.wait({job}, timeout=POLL_S)
        self.tickets.remove(ticket)

    def ask_work(self, question: str, history: list[tuple[str, str]] = ()):
        """The worker's job for one question: emits sources once, then each token; returns the --json shape."""
        from rag.cli import to_json

        def work(emit):
            answerer, out, t0 = self.answerer, {}, time.perf_counter()
            tokens = 0

            def on_token(text: str) -> None:
                nonlocal tokens
                if not tokens:
                    emit("sources", to_json({**out, "result": ""}))
                tokens += 1
                emit("token", {"text": text})

            answerer.ask(question, out, on_token=on_token, history=history)
            if not tokens:
                emit("sources", to_json(out))
            stopped = answerer.stop is not None and answerer.stop.event.is_set()
            logger.info("answered in %.1f s, %d tokens%s", time.perf_counter() - t0, tokens,
                        " (stopped: the client left)" if stopped else "")
            return to_json(out)

        return work

    def add_work(self, path: Path, new: bool):
        """The worker's job for an upload: a new Answerer over the files plus this one (the stored
        vectors are reused, only the new file is embedded; the loaded models are reused: Answerer's `models`)."""
        from rag.cli import Answerer

        def work(emit):
            if path.resolve() in self.indexed:
                return False  # the same content was uploaded before
            # A file inside a --file folder is found by walking that folder again; listed twice, it would be indexed twice.
            inside = any(f.is_dir() and f.resolve() in path.resolve().parents for f in self.files)
            files = self.files if inside else [*self.files, path]
            try:
                answerer = Answerer(replace(self.cfg, file=files, reindex=False), time.perf_counter(), models=self.models)
            except BaseException:
                if new:
                    path.unlink(missing_ok=True)
                raise
            self.files, self.answerer = files, answerer
            self.indexed = self.paths()
            return True

        return work

    def paths(self) -> list[Path]:
        from tunerag.documents import find_documents

        return [p.resolve() for p in find_documents(self.files)]

    def documents(self) -> list[dict]:
        upload_dir = self.cfg.upload_dir.resolve()
        return [{"name": self.names.get(p.name, p.name), "file": p.name, "source": str(p),
                 "bytes": p.stat().st_size if p.exists() else None, "uploaded": p.parent == upload_dir}
                for p in self.indexed]

    def health(self) -> dict:
        cfg = self.cfg
        return {"status": "ok", "models": {"embeddings": cfg.embeddings, "llm": None if cfg.retrieve_only else cfg.llm},
                "documents": len(self.answerer.files), "chunks": self.answerer.report.chunks,
                "queue": len(self.tickets), "auth": cfg.api_key is not None,
                "upload": {"types": upload_suffixes(), "max_mb": cfg.max_upload_mb}}


def build_app(cfg: ServeConfig):
    """The FastAPI app over a loaded Answerer (models load here, before anything listens)."""
    from fastapi import APIRouter, Depends, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.sse import EventSourceResponse, ServerSentEvent
    from fastapi_offline import FastAPIOffline
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    server = Server(cfg)
    page = (package_files("rag") / "static" / "index.html").read_text(encoding="utf-8")
    limit = int(cfg.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.stop_answer()  # shutting down: a generation still running ends at its next token
        server.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPIOffline(title="tunerag", summary="Questions about your documents, answered from them.",
                         lifespan=lifespan)
    app.state.server = server
    bearer = HTTPBearer(auto_error=False, description="Only when the server has --api-key / $TUNERAG_API_KEY.")

    def guard(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "cross-site request refused: use the page this server serves")
        if cfg.api_key is None:
            # No key on loopback: refuse other host names, so a web page cannot reach this server
            # by pointing its own domain at 127.0.0.1 (DNS rebinding).
            if (request.url.hostname or "") not in LOOPBACK_NAMES:
                raise HTTPException(403, f"host {request.url.hostname!r} refused: without --api-key only "
                                         "http://127.0.0.1 and http://localhost are served")
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, cfg.api_key.encode()):
            raise HTTPException(401, "this server needs its API key: send `Authorization: Bearer KEY`",
                                headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/api", dependencies=[Depends(guard)])

    @app.exception_handler(TuneragError)
    async def user_error(request, e: TuneragError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return JSONResponse({"detail": detail}, status_code=422)

    def nonempty(question: str) -> str:
        if not question.strip():
            raise HTTPException(400, "the question is empty; ask something about the documents")
        return question.strip()

    class Turn(BaseModel):
        question: str
        answer: str

    class Ask(BaseModel):
        question: str
        # the conversation so far, oldest first: a follow-up ("And in 2024?") is searched for with the
        # question before it, and the turns go into the prompt while the context window has room
        history: list[Turn] = []

    @app.get("/", include_in_schema=False)
    async def index_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")})

    @api.post("/ask")
    async def ask(body: Ask, request: Request) -> dict:
        """Answer one question: {"query", "result", "source_documents": [{"text", "source", "chunk", "score"}]},
        the --json shape of rag.cli (with whatever that shape adds, such as evidence and citations)."""
        question = nonempty(body.question)
        history = [(turn.question, turn.answer) for turn in body.history][-HISTORY_TURNS:]
        result = None
        async for kind, data in server.run(request, server.ask_work(question, history), stoppable=True):
            if kind == "done":
                result = data
        if result is None:
            raise HTTPException(499, "the client left before the answer")
        return result

    def parse_history(history: str = "[]") -> list[tuple[str, str]]:  # checked before the stream starts
        try:
            return [(str(turn["question"]), str(turn["answer"])) for turn in json.loads(history)][-HISTORY_TURNS:]
        except (ValueError, TypeError, KeyError):
            raise HTTPException(400, 'history must be JSON: [{"question": "...", "answer": "..."}, ...]') from None

    @api.get("/ask/stream", response_class=EventSourceResponse)
    async def ask_stream(request: Request, question: Annotated[str, Depends(nonempty)],
                         turns: Annotated[list, Depends(parse_history)]):
        """Server-sent events: `queued` {"ahead": N} (first, and as the line moves), `sources` (the --json
        shape, before the first token), `token` {"text"} each, then `done` (the --json shape) or
        `error` {"detail"}. Disconnecting stops the answer. `history`: the conversation so far as JSON,
        [{"question", "answer"}, ...] oldest first, as in POST /api/ask."""
        try:
            async for kind, data in server.run(request, server.ask_work(question, turns), stoppable=True):
                yield ServerSentEvent(event=kind, data=data)
        except TuneragError as e:
            yield ServerSentEvent(event="error", data={"detail": str(e)})
        except Exception as e:  # a library failure: this answer only; the server goes on
            logger.exception("answer failed")
            yield ServerSentEvent(event="error", data={"detail": f"{type(e).__name__}: {first_line(e)}"})

    @api.get("/documents")
    async def documents() -> list[dict]:
        """The indexed documents: [{"name", "file", "source", "bytes", "uploaded"}]."""
        return server.documents()

    @api.post("/documents", status_code=201, max_body_size=limit + MULTIPART_SLACK, responses={
        200: {"description": "Already indexed (the same content)"}, 413: {"description": "Over --max-upload-mb"},
        415: {"description": "Not a type the index reads"}, 422: {"description": "Not a readable document"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
    async def upload(request: Request):
        """Upload one document (multipart field `file`) and index it. It is stored in --upload-dir as
        SHA256.SUFFIX, never under the name the client sent. Waits its turn behind answers in progress."""
        # Read here, after `guard`: a body parameter would be read before any dependency runs.
        form = await request.form(max_files=1, max_fields=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "send the document as the multipart form field 'file'")
        suffix = PurePath(upload.filename or "").suffix.lower()
        accepted = upload_suffixes()
        if suffix not in accepted:
            raise HTTPException(415, f"file type {suffix or '(none)'!r} is not accepted; upload {', '.join(accepted)}")
        stored = await run_in_threadpool(store_upload, upload.file, cfg.upload_dir, suffix, limit)
        if stored is None:
            raise HTTPException(413, f"the file is over the {cfg.max_upload_mb:g} MB upload limit (--max-upload-mb)")
        path, size, new = stored
        if size == 0:
            if new:
                path.unlink()
            raise HTTPException(400, "the file is empty")
        added = None
        try:
            async for kind, data in server.run(request, server.add_work(path, new)):
                if kind == "done":
                    added = data
        except TuneragError as e:  # unreadable: binary, no text layer, ...
            message = str(e).replace(str(path.resolve()), upload.filename).replace(str(path), upload.filename)
            raise HTTPException(422, message) from None
        if added is None:
            raise HTTPException(499, "the client left; the document is indexed all the same")
        server.names[path.name] = PurePath(upload.filename.replace("\\", "/")).name
        document = {"name": server.names[path.name], "file": path.name, "bytes": size, "sha256": path.stem}
        return JSONResponse({"document": document, "added": added, "chunks": server.answerer.report.chunks},
                            status_code=201 if added else 200)

    @api.get("/health")
    async def health() -> dict:
        """{"status", "models", "documents", "chunks", "queue" (requests waiting or running), "auth", "upload"}."""
        return server.health()

    app.include_router(api)
    return app


def main(cfg: ServeConfig) -> None:
    import uvicorn

    try:  # bound before the models load, so a busy port fails at once
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    except OSError as e:
        raise TuneragError(f"cannot listen on {cfg.host}:{cfg.port} ({os.strerror(e.errno) if e.errno else e}); "
                           "pass another --port or --host") from None
    with sock:
        app = build_app(cfg)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        logger.info("serving %s on http://%s:%d (API page: /docs)%s", ", ".join(app.state.server.answerer.files),
                    host, cfg.port, "; /api needs the API key" if cfg.api_key else "")
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down cleanly, then re-raises the Ctrl-C it caught
            logger.info("stopped")


if __name__ == "__main__":
    run_cli(main, ServeConfig)
