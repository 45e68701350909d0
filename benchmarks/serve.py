"""The service under concurrent load: N questions at once in `prag` mode, batched vs answered one by one.

    # once, untimed: index the corpus, choose N questions whose top-k documents all differ, build their LoRAs
    python benchmarks/serve.py prepare --home runs/bench-serve/home --corpus ../shared/data/corpus.jsonl \
        --questions ../shared/data/qa/popqa/dev.jsonl --n 16
    # timed: a real `prag serve` process per setting, N concurrent HTTP clients, one question each per round
    /work/tools/quiet python benchmarks/serve.py run --home runs/bench-serve/home --rounds 3 \
        --out runs/bench-serve/result.json

Both settings run in one invocation on the same questions and documents: `--max-batch N` (the
questions of a round share one batched generation, each row with its own merged LoRAs) and
`--max-batch 1` (the same server answering one question at a time). Reported: requests per second
over the timed rounds, p50/p95 latency per request, the ratio, and the batch sizes the server ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def prepare(args) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from prag import Config, Pipeline
    from prag.evaluate import load_questions

    pipeline = Pipeline(args.home, Config())
    if not (Path(args.home) / "index" / "retriever.json").exists():
        pipeline.index(args.corpus)
    chosen, seen = [], set()
    for q in load_questions(args.questions, slice="tune"):  # questions 100 on: the tune slice
        ids = [p.id for p in pipeline.retrieve(q.question, args.top_k)]
        if len(ids) == args.top_k and not seen & set(ids):
            chosen.append({"id": q.id, "question": q.question, "documents": ids})
            seen.update(ids)
        if len(chosen) == args.n:
            break
    passages = [pipeline.retriever.passage(i) for q in chosen for i in q["documents"]]
    built = pipeline.parameterize(passages)
    (Path(args.home) / "bench-questions.json").write_text(json.dumps(chosen, indent=1))
    print(f"{len(chosen)} questions, {len(passages)} documents ({built} built now) in {args.home}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: str, max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "prag.cli", "serve", "--home", home, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--log-level", "warning", *extra]
    process = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not start")


def one_round(url: str, questions: list[dict], mode: str, top_k: int) -> tuple[float, list[float], list[dict]]:
    """Every question at once, one client thread each; returns the wall time, latencies and bodies."""
    latencies, bodies = [0.0] * len(questions), [None] * len(questions)
    barrier = threading.Barrier(len(questions) + 1)

    def ask(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            barrier.wait()
            t = time.perf_counter()
            response = client.post(
                url + "/v1/answer", json={"question": questions[i]["question"], "mode": mode, "top_k": top_k}
            )
            latencies[i] = time.perf_counter() - t
            response.raise_for_status()
            bodies[i] = response.json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, bodies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(args) -> None:
    questions = json.loads((Path(args.home) / "bench-questions.json").read_text())[: args.n]
    results = {}
    for name, max_batch in (("batched", len(questions)), ("one_by_one", 1)):
        process, url = start_server(args.home, max_batch, args.server_args)
        try:
            one_round(url, questions, args.mode, args.top_k)  # warm-up: first kernels of each shape, page cache
            walls, latencies, batch_sizes = [], [], []
            for _ in range(args.rounds):
                wall, lat, bodies = one_round(url, questions, args.mode, args.top_k)
                walls.append(wall)
                latencies += lat
                batch_sizes += [b["batch_size"] for b in bodies]
                assert all(b["lora_documents"] == q["documents"] for b, q in zip(bodies, questions, strict=True))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        results[name] = {
            "max_batch": max_batch,
            "requests": len(latencies),
            "requests_per_s": len(latencies) / sum(walls),
            "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 95),
            "round_wall_s": walls,
            "mean_batch_size": statistics.mean(batch_sizes),
        }
        print(name, json.dumps(results[name]))
    results["throughput_ratio"] = results["batched"]["requests_per_s"] / results["one_by_one"]["requests_per_s"]
    results["setup"] = {
        "questions": len(questions),
        "mode": args.mode,
        "top_k": args.top_k,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "server_args": args.server_args,
    }
    print(f"batched / one by one: {results['throughput_ratio']:.2f}x requests per second")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--home", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--top-k", type=int, default=3)
    p = commands.add_parser("run")
    p.add_argument("--home", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--mode", default="prag")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--server-args", nargs="*", default=[], help="more `prag serve` options")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
