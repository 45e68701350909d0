"""Documents added while the service runs: a durable log, their status, and the background builder.

    HOME/ingest/documents.jsonl   every accepted document, appended and fsynced before the 202
    HOME/ingest/failed.jsonl      documents whose parameterization failed, with the error

The server process is the only writer of both files. A document is searchable as soon as it is
logged (the live index's delta, retrieval/live.py). Augmenting and training it happen in a separate
builder process (its own model copy, one torch thread, a lower CPU priority), so that neither its
compute nor the interpreter lock it holds stalls the questions being answered; the builder also
folds logged documents into the main index on disk when it has nothing to build. On restart the log
is read back: documents without an adapter are queued again, and ones the main index lacks are put
back in the delta. Status: `queued`, `building`, `ready` (an adapter is stored), `failed`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from ..corpus import Passage

MAX_DOCUMENTS_PER_REQUEST = 64
MAX_TITLE_CHARS = 500
MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 200


def check_documents(documents: list[dict], known: Callable[[str], Passage | None]) -> list[Passage]:
    """Validate documents to add (`{"id"?, "title", "text"}`), naming the field of the first problem.

    `known(id)` returns an already indexed or logged passage. The same id with the same title and text
    is accepted again (idempotent); with different ones it is a conflict (`DuplicateDocument`).
    Documents without an id get one from a hash of their contents, so resending one adds nothing.
    """
    import hashlib

    if not isinstance(documents, list) or not documents:
        raise ValueError("documents: must be a non-empty list")
    if len(documents) > MAX_DOCUMENTS_PER_REQUEST:
        raise ValueError(f"documents: {len(documents)} documents, at most {MAX_DOCUMENTS_PER_REQUEST} per request")
    passages: dict[str, Passage] = {}
    for i, doc in enumerate(documents):
        where = f"documents[{i}]"
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: must be an object with 'title' and 'text'")
        title, text, doc_id = doc.get("title"), doc.get("text"), doc.get("id")
        if not isinstance(title, str):
            raise ValueError(f"{where}.title: must be a string")
        if len(title) > MAX_TITLE_CHARS:
            raise ValueError(f"{where}.title: {len(title)} characters, at most {MAX_TITLE_CHARS}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.text: must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"{where}.text: {len(text)} characters, at most {MAX_TEXT_CHARS}")
        if doc_id is None:
            doc_id = "doc-" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]
        if not isinstance(doc_id, str) or not doc_id.strip() or len(doc_id) > MAX_ID_CHARS:
            raise ValueError(f"{where}.id: must be a non-empty string of at most {MAX_ID_CHARS} characters")
        if any(c in doc_id for c in "\n\r\t/") or doc_id != doc_id.strip():
            raise ValueError(f"{where}.id: {doc_id!r} has a slash, a control character or surrounding spaces")
        passage = Passage(doc_id, title, text)
        existing = passages.get(doc_id) or known(doc_id)
        if existing is not None and (existing.title, existing.text) != (title, text):
            raise DuplicateDocument(f"{where}.id: {doc_id!r} already names a document with a different title or text")
        passages[doc_id] = passage
    return list(passages.values())


class DuplicateDocument(ValueError):
    """An id that already names another document (HTTP 409)."""


class DocumentLog:
    """The append-only log of accepted documents, and of failed builds. Torn last lines (a crash mid-write,
    before the 202) are cut off when the log is opened."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.documents_path = self.root / "documents.jsonl"
        self.failed_path = self.root / "failed.jsonl"
        self.documents: dict[str, Passage] = {}
        self.failed: dict[str, str] = {}
        for row in self._read(self.documents_path):
            self.documents[row["id"]] = Passage(row["id"], row["title"], row["text"])
        for row in self._read(self.failed_path):
            self.failed[row["id"]] = row["error"]
        self._lock = threading.Lock()

    def add(self, passages: list[Passage]) -> list[Passage]:
        """Append the passages not logged yet, durably (fsync of the file, and of the folder on creation)."""
        with self._lock:
            fresh = [p for p in passages if p.id not in self.documents]
            if fresh:
                lines = "".join(
                    json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n" for p in fresh
                )
                self._append(self.documents_path, lines)
                for p in fresh:
                    self.documents[p.id] = p
            return fresh

    def mark_failed(self, doc_id: str, error: str) -> None:
        with self._lock:
            self._append(self.failed_path, json.dumps({"id": doc_id, "error": error}, ensure_ascii=False) + "\n")
            self.failed[doc_id] = error

    def _append(self, path: Path, text: str) -> None:
        created = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new file's name must survive a crash too
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        data = path.read_bytes()
        good = data.rfind(b"\n") + 1  # anything after the last newline was never acknowledged
        if good < len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        rows = []
        for number, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON: {error.msg}") from None
        return rows


# -- the builder process --------------------------------------------------------------------------------


def _passage_dict(p: Passage) -> dict:
    return {"id": p.id, "title": p.title, "text": p.text}


def builder_main(home: str, overrides: dict, conn: Connection, threads: int, group_size: int, parent: int) -> None:
    """The builder process: parameterize the passages it is sent (priority ones first), in small groups,
    reporting `building` / `ready` / `failed`; when idle, fold the logged documents into the main index.

    Messages in: {"build": [passage], "priority": bool}, {"index": [passage]}, {"stop": true}.
    Messages out: {"building": [id]}, {"ready": [id]}, {"failed": {id: error}}, {"indexed": [id]}.
    """
    _die_with_parent(parent)
    try:
        os.nice(10)  # the answering process comes first when both want a core
    except OSError:
        pass
    import torch

    from ..config import Config
    from ..pipeline import Pipeline
    from ..retrieval import load_retriever

    torch.set_num_threads(threads)
    config = Config()
    for key, value in overrides.items():
        config.set(key, value)
    config.model.threads = threads  # every phase on the builder's share of the cores, whatever else runs
    pipeline = Pipeline(home, config)
    queue: dict[str, Passage] = {}  # insertion order: priority documents are moved to the front
    to_index: dict[str, Passage] = {}

    def receive(message: dict) -> bool:
        if message.get("stop"):
            return False
        passages = [Passage(d["id"], d["title"], d["text"]) for d in message.get("build", [])]
        if message.get("priority"):
            front = {p.id: p for p in passages}
            rest = {i: p for i, p in queue.items() if i not in front}
            queue.clear()
            queue.update(front | rest)
        else:
            for p in passages:
                queue.setdefault(p.id, p)
        for d in message.get("index", []):
            to_index[d["id"]] = Passage(d["id"], d["title"], d["text"])
        return True

    try:
        while True:
            idle = not queue and not to_index
            while conn.poll(None if idle else 0):
                if not receive(conn.recv()):
                    return
                idle = False
            if queue:
                group = []
                for doc_id in list(queue)[:group_size]:
                    group.append(queue.pop(doc_id))
                conn.send({"building": [p.id for p in group]})
                _build(pipeline, group, conn)
            elif to_index:
                main = load_retriever(pipeline.home / "index")
                fresh = [p for p in to_index.values() if p.id not in main.by_id]
                if fresh:
                    from ..retrieval import BM25Retriever

                    BM25Retriever.build(main.passages + fresh, show_progress=False).save(pipeline.home / "index")
                conn.send({"indexed": list(to_index)})
                to_index.clear()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the server is gone


def _build(pipeline, group: list[Passage], conn: Connection) -> None:
    """Parameterize a group; if it fails, each document alone, so one bad document fails alone."""
    try:
        pipeline.parameterize(group, show_progress=False)
        conn.send({"ready": [p.id for p in group]})
        return
    except Exception:  # noqa: BLE001  (reported per document below)
        if len(group) == 1:
            error = traceback.format_exc(limit=3).strip().splitlines()[-1]
            conn.send({"failed": {group[0].id: error}})
            return
    for p in group:
        _build(pipeline, [p], conn)


def _die_with_parent(parent: int) -> None:
    """Exit as soon as the server is gone (even killed with SIGKILL), so that no orphan keeps building
    beside the builder of a restarted server. A watchdog thread, since the builder's own thread may be
    deep in a training step."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="prag-builder-watchdog", daemon=True).start()


class Builder:
    """The server's handle on the builder process: starts it, sends it work, and turns its reports into
    document status and callbacks. Restarts it if it dies, resending what was not done."""

    def __init__(
        self,
        home: Path,
        overrides: dict,
        threads: int = 1,
        group_size: int = 4,
        on_ready: Callable[[list[str]], None] = lambda ids: None,
        on_failed: Callable[[dict[str, str]], None] = lambda errors: None,
        on_indexed: Callable[[list[str]], None] = lambda ids: None,
    ):
        self.home, self.overrides, self.threads, self.group_size = Path(home), overrides, threads, group_size
        self.on_ready, self.on_failed, self.on_indexed = on_ready, on_failed, on_indexed
        self.status: dict[str, str] = {}  # queued / building, for documents sent and not done
        self.pending: dict[str, Passage] = {}  # sent to build, not reported ready or failed
        self.unindexed: dict[str, Passage] = {}  # sent to index, not reported indexed
        self.built = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._restarts = 0
        self._process = None
        self._conn: Connection | None = None

    def start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied model or threads
        parent, child = context.Pipe()
        self._process = context.Process(
            target=builder_main,
            args=(str(self.home), self.overrides, child, self.threads, self.group_size, os.getpid()),
            name="prag-builder",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent
        with self._lock:  # a restarted builder gets what its predecessor left
            if self.pending:
                self._send({"build": [_passage_dict(p) for p in self.pending.values()]})
                self.status.update({i: "queued" for i in self.pending})
            if self.unindexed:
                self._send({"index": [_passage_dict(p) for p in self.unindexed.values()]})
        threading.Thread(target=self._read, args=(parent,), name="prag-builder-reader", daemon=True).start()

    def build(self, passages: list[Passage], priority: bool = False) -> None:
        """Queue passages for parameterization (priority: questions wait for them), once each."""
        with self._lock:
            fresh = [p for p in passages if p.id not in self.pending]
            for p in fresh:
                self.pending[p.id] = p
                self.status[p.id] = "queued"
            todo = passages if priority else fresh
            if todo:
                self._send({"build": [_passage_dict(p) for p in todo], "priority": priority})

    def index(self, passages: list[Passage]) -> None:
        with self._lock:
            for p in passages:
                self.unindexed[p.id] = p
            self._send({"index": [_passage_dict(p) for p in passages]})

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.unindexed)

    @property
    def queue_depth(self) -> int:
        return sum(1 for s in self.status.values() if s == "queued")

    def _send(self, message: dict) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            pass  # the builder is down: the reader restarts it and resends what is pending

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                for doc_id in message.get("building", []):
                    if doc_id in self.pending:
                        self.status[doc_id] = "building"
                ready = [i for i in message.get("ready", []) if self.pending.pop(i, None) is not None]
                failed = {i: e for i, e in message.get("failed", {}).items() if self.pending.pop(i, None) is not None}
                for doc_id in [*ready, *failed]:
                    self.status.pop(doc_id, None)
                self.built += len(ready)
                indexed = [i for i in message.get("indexed", []) if self.unindexed.pop(i, None) is not None]
            for callback, arg in ((self.on_failed, failed), (self.on_ready, ready), (self.on_indexed, indexed)):
                if arg:
                    try:
                        callback(arg)
                    except Exception:  # noqa: BLE001  (a failing report must not stop the reports after it)
                        traceback.print_exc()
        if not self._stopping:  # died (killed, out of memory): start another, after longer pauses if it keeps dying
            self._restarts += 1
            time.sleep(min(60.0, 2.0**self._restarts))
            if not self._stopping:
                self.start()

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None:
            try:
                self._conn.send({"stop": True})
            except (OSError, ValueError):
                pass
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
