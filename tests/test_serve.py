"""`prag serve` as a client sees it: a real server process on a loopback port, spoken to over HTTP.

The server runs the tiny random model (answers are noise; what is checked is the service around them).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import Server, make_workspace
from prometheus_client.parser import text_string_to_metric_families

from prag import ALL_MODES
from prag.pipeline import GENERATED_LORAS

QUESTION = "What is George Rankin's occupation?"


def wait_ready(server: Server, doc_ids: list[str], timeout: float = 300) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = {i: server.get(f"/v1/documents/{i}").json() for i in doc_ids}
        if all(r["status"] in ("ready", "failed") for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_health_page_and_schema(demo_server):
    health = httpx.get(demo_server.url + "/healthz")  # no key needed
    assert health.status_code == 200 and health.json()["passages"] >= 217
    page = httpx.get(demo_server.url + "/")
    assert page.status_code == 200 and 'id="question"' in page.text
    assert httpx.get(demo_server.url + "/static/app.js").status_code == 200
    schema = demo_server.get("/openapi.json").json()
    assert {"/v1/answer", "/v1/chat/completions", "/v1/documents", "/v1/documents/{doc_id}", "/v1/models"} <= set(
        p.replace(":path", "") for p in schema["paths"]
    )


def test_every_mode_answers(demo_server):
    answers = {}
    for mode in GENERATED_LORAS:  # no translator trained in this workspace: the error says how to train one
        response = demo_server.post("/v1/answer", {"question": QUESTION, "mode": mode, "top_k": 2})
        assert response.status_code == 422 and response.json()["error"]["param"] == "mode", response.text
        assert "prag translator train" in response.json()["error"]["message"]
    for mode in [m for m in ALL_MODES if m not in GENERATED_LORAS]:
        response = demo_server.post("/v1/answer", {"question": QUESTION, "mode": mode, "top_k": 2})
        assert response.status_code == 200, response.text
        answers[mode] = body = response.json()
        assert body["mode"] == mode and isinstance(body["answer"], str) and body["text"]
        assert body["timings_ms"]["generation"] > 0 and body["timings_ms"]["total"] >= body["timings_ms"]["generation"]
        assert body["missing_adapters"] == []  # the question waited until its documents were built
    assert answers["closed"]["passages"] == [] and answers["closed"]["lora_documents"] == []
    retrieved = [p["id"] for p in answers["rag"]["passages"]]
    assert len(retrieved) == 2 and answers["rag"]["passages"][0]["title"] == "George Rankin"
    assert answers["rag"]["passages"][0]["score"] >= answers["rag"]["passages"][1]["score"] > 0
    for mode in ("prag", "combine"):
        assert [p["id"] for p in answers[mode]["passages"]] == retrieved
        assert answers[mode]["lora_documents"] == retrieved
        assert demo_server.get(f"/v1/documents/{retrieved[0]}").json()["status"] == "ready"
    for mode in ("prag-unrelated", "combine-unrelated"):
        assert len(answers[mode]["lora_documents"]) == 2 and not set(answers[mode]["lora_documents"]) & set(retrieved)


def test_openai_client(demo_server):
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key=demo_server.key, max_retries=0)
    assert {m.id for m in client.models.list()} == set(ALL_MODES)
    completion = client.chat.completions.create(
        model="rag", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    )
    assert completion.object == "chat.completion" and completion.model == "rag"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 50 and completion.usage.completion_tokens > 0
    direct = demo_server.post("/v1/answer", {"question": QUESTION, "mode": "rag"}).json()
    assert completion.choices[0].message.content == direct["answer"]  # greedy: the same answer either way
    stream = client.chat.completions.create(
        model="closed", messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.UnprocessableEntityError, match="model: unknown mode"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=demo_server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_ingest_then_retrieve(demo_server):
    doc = {
        "title": "Zorbania",
        "text": "Zorbania is an island republic in the Quillen Sea. Its capital is Marrowport and its "
        "president is Odile Faversham, elected in 2019.",
    }
    response = demo_server.post("/v1/documents", {"documents": [doc]})
    assert response.status_code == 202, response.text
    [doc_id] = response.json()["ids"]
    status = demo_server.get(f"/v1/documents/{doc_id}").json()
    assert status["title"] == "Zorbania" and status["status"] in ("queued", "building", "ready")
    # searchable by the very next question, before any re-index
    answer = demo_server.post("/v1/answer", {"question": "Who is the president of Zorbania?", "mode": "rag"}).json()
    assert answer["passages"][0]["id"] == doc_id
    # sent again: the same id, nothing added; the same id with another text: a conflict naming the field
    assert demo_server.post("/v1/documents", {"documents": [doc]}).json()["ids"] == [doc_id]
    clash = demo_server.post("/v1/documents", {"documents": [{"id": doc_id, "title": "Zorbania", "text": "other"}]})
    assert clash.status_code == 409 and clash.json()["error"]["param"] == "documents[0].id"
    # parameterized in the background, then merged into prag answers
    assert wait_ready(demo_server, [doc_id])[doc_id]["status"] == "ready"
    prag = demo_server.post("/v1/answer", {"question": "Who is the president of Zorbania?", "mode": "prag"}).json()
    assert doc_id in prag["lora_documents"]
    # folded into the main index by the builder when it had nothing else to do
    deadline = time.monotonic() + 120
    while demo_server.get(f"/v1/documents/{doc_id}").json()["index"] != "main" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert demo_server.get(f"/v1/documents/{doc_id}").json()["index"] == "main"
    again = demo_server.post("/v1/answer", {"question": "Who is the president of Zorbania?", "mode": "rag"}).json()
    assert again["passages"][0]["id"] == doc_id


BAD_ANSWERS = [
    (b'{"question": "who", ', 400, "body"),
    (b"", 422, "body"),
    (b"[1, 2]", 422, "body"),
    ({"mode": "rag"}, 422, "question"),
    ({"question": ""}, 422, "question"),
    ({"question": "   "}, 422, "question"),
    ({"question": 42}, 422, "question"),
    ({"question": "x" * 2001}, 422, "question"),
    ({"question": "who", "top_k": 0}, 422, "top_k"),
    ({"question": "who", "top_k": -5}, 422, "top_k"),
    ({"question": "who", "top_k": 51}, 422, "top_k"),
    ({"question": "who", "top_k": "3"}, 422, "top_k"),
    ({"question": "who", "top_k": True}, 422, "top_k"),
    ({"question": "who", "mode": "bogus"}, 422, "mode"),
    ({"question": "who", "modes": "rag"}, 422, "modes"),
]
BAD_DOCUMENTS = [
    ({"documents": []}, 422, "documents"),
    ({"documents": [{"title": "t"}]}, 422, "documents[0].text"),
    ({"documents": [{"title": "t", "text": " "}]}, 422, "documents[0].text"),
    ({"documents": [{"title": "t", "text": "x" * 20001}]}, 422, "documents[0].text"),
    ({"documents": [{"title": "t", "text": "a", "id": ""}]}, 422, "documents[0].id"),
    ({"documents": [{"title": 5, "text": "a"}]}, 422, "documents[0].title"),
    ({"documents": [{"title": "t", "text": "a"}, {"text": "b"}]}, 422, "documents[1].title"),
    # the id of a corpus passage, with another text
    ({"documents": [{"id": "387b113c698ef271", "title": "t", "text": "a"}]}, 409, "documents[0].id"),
    # one id twice in a request, with two texts
    (
        {"documents": [{"id": "d", "title": "t", "text": "a"}, {"id": "d", "title": "t", "text": "b"}]},
        409,
        "documents[1].id",
    ),
]
BAD_CHATS = [
    ({"model": "rag"}, 422, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "q"}]}, 422, "model"),
    ({"model": "rag", "messages": [{"role": "system", "content": "q"}]}, 422, "messages"),
    ({"model": "rag", "messages": [{"role": "user", "content": ""}]}, 422, "messages[0].content"),
    ({"model": "rag", "messages": [{"role": "user", "content": "q"}], "top_k": 99}, 422, "top_k"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [("/v1/answer", *case) for case in BAD_ANSWERS]
    + [("/v1/documents", *case) for case in BAD_DOCUMENTS]
    + [("/v1/chat/completions", *case) for case in BAD_CHATS],
)
def test_bad_input_is_a_4xx_naming_the_field(demo_server, path, body, status, field):
    headers = demo_server.headers | {"Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(demo_server.url + path, content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error


def test_unknown_document_and_oversized_bodies(demo_server):
    missing = demo_server.get("/v1/documents/no-such-document")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "doc_id"
    huge = json.dumps({"documents": [{"title": "t", "text": "x" * (2 << 20)}]}).encode()
    too_large = httpx.post(demo_server.url + "/v1/documents", content=huge, headers=demo_server.headers)
    assert too_large.status_code == 413 and too_large.json()["error"]["param"] == "body"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536

    streamed = httpx.post(demo_server.url + "/v1/answer", content=chunked(), headers=demo_server.headers)
    assert streamed.status_code == 413 and streamed.json()["error"]["param"] == "body"
    assert demo_server.post("/v1/answer", {"question": QUESTION, "mode": "closed"}).status_code == 200  # still fine


def test_the_key_guards_every_endpoint_but_health_and_page(demo_server):
    guarded = [
        ("POST", "/v1/answer", {"question": QUESTION}),
        ("POST", "/v1/chat/completions", {"model": "rag", "messages": [{"role": "user", "content": QUESTION}]}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/documents", {"documents": [{"title": "t", "text": "never stored"}]}),
        ("GET", "/v1/documents/387b113c698ef271", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", None),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {demo_server.key}"}):
        for method, path, body in guarded:
            response = httpx.request(method, demo_server.url + path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["param"] == "authorization"
    # a malformed body without the key is still a 401: nothing is parsed before the key is checked
    assert httpx.post(demo_server.url + "/v1/answer", content=b"{").status_code == 401
    assert httpx.get(demo_server.url + "/healthz").status_code == 200
    assert httpx.get(demo_server.url + "/").status_code == 200
    assert demo_server.get("/v1/documents/387b113c698ef271").status_code == 200


def test_32_clients_5_requests_each(demo_server):
    """Concurrent clients in every mode: no errors, and the service did batch them."""
    modes = ["closed", "rag", "prag", "combine"]
    questions = [
        QUESTION,
        "What is Henry Feilden's occupation?",
        "What is Eleanor Davis's occupation?",
        "What is Scooter Braun's occupation?",
    ]
    # the documents these questions retrieve are built first, so the run measures answering, not building
    for q in questions:
        assert demo_server.post("/v1/answer", {"question": q, "mode": "prag", "top_k": 2}).status_code == 200
    start = threading.Barrier(32)

    def client(i: int) -> list[int]:
        codes = []
        with httpx.Client(base_url=demo_server.url, headers=demo_server.headers, timeout=300) as http:
            start.wait()
            for j in range(5):
                body = {"question": questions[(i + j) % 4], "mode": modes[(i * 5 + j) % 4], "top_k": 2}
                response = http.post("/v1/answer", json=body)
                codes.append(response.status_code)
                assert response.status_code != 200 or response.json()["mode"] == body["mode"]
        return codes

    with ThreadPoolExecutor(32) as pool:
        codes = [c for codes in pool.map(client, range(32)) for c in codes]
    assert codes == [200] * 160
    metrics = demo_server.get("/metrics").text
    count = _metric(metrics, "prag_batch_size_count")
    assert _metric(metrics, "prag_batch_size_sum") / count > 2  # questions really shared generations


def _metric(text: str, name: str, **labels: str) -> float:
    """A sample of the Prometheus text, by name and labels (summed over labels not given)."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert values, f"{name} {labels} not in /metrics"
    return sum(values)


def test_metrics(demo_server):
    demo_server.post("/v1/answer", {"question": QUESTION, "mode": "rag"})
    demo_server.post("/v1/answer", {"question": QUESTION, "mode": "rag", "top_k": 0})
    response = demo_server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _metric(text, "prag_requests_total", code="200", endpoint="/v1/answer", mode="rag") >= 1
    assert _metric(text, "prag_request_errors_total", code="422", endpoint="/v1/answer", mode="rag") >= 1
    assert _metric(text, "prag_request_latency_seconds_count", endpoint="/v1/answer", mode="rag") >= 2
    for gauge in ("prag_answer_queue_depth", "prag_answers_waiting_for_documents", "prag_build_queue_depth"):
        assert _metric(text, gauge) >= 0
    assert _metric(text, "prag_documents_built_total") >= 2  # the documents built for earlier questions


def test_sigkill_during_ingestion_loses_nothing(tmp_path, tiny_model_dir):
    """Every document that got a 202 survives a SIGKILL of the server, and its parameterization resumes."""
    home = make_workspace(tmp_path / "home", tiny_model_dir)
    server = Server(home).start()
    ids = []
    try:
        for i in range(6):  # enough that the builder cannot have finished when the server is killed
            docs = [
                {"title": f"Kill test {i}-{j}", "text": f"Fact number {i}-{j}: the quorvex of Tallin-{i}{j} is blue."}
                for j in range(4)
            ]
            response = server.post("/v1/documents", {"documents": docs})
            assert response.status_code == 202
            ids += response.json()["ids"]
        statuses = {server.get(f"/v1/documents/{i}").json()["status"] for i in ids}
        builder = server.children()
        assert builder, "the builder process should be running"
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    assert statuses - {"ready"}, "killed after everything was built: the test did not interrupt ingestion"
    deadline = time.monotonic() + 30  # the builder dies with its server: no orphan keeps building
    while any(os.path.exists(f"/proc/{pid}") for pid in builder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in builder)

    restarted = Server(home).start()
    try:
        rows = wait_ready(restarted, ids)
        assert {r["status"] for r in rows.values()} == {"ready"}, rows
        answer = restarted.post("/v1/answer", {"question": "What is the quorvex of Tallin-21?", "mode": "rag"})
        assert answer.json()["passages"][0]["title"] == "Kill test 2-1"
    finally:
        restarted.stop()


def test_a_killed_builder_is_replaced(demo_server):
    """The builder process dies (out of memory, killed): the server starts another and builds on."""
    builders = [p for p in demo_server.children() if b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(builders) == 1
    os.kill(builders[0], signal.SIGKILL)
    doc = {"title": "Builder restart", "text": "After the builder was killed, the snark of Pellow turned green."}
    response = demo_server.post("/v1/documents", {"documents": [doc]})
    assert response.status_code == 202
    [doc_id] = response.json()["ids"]
    assert wait_ready(demo_server, [doc_id])[doc_id]["status"] == "ready"
    assert builders[0] not in demo_server.children()
