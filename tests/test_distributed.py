"""Parameterizing on a Ray cluster (a head and two worker nodes on loopback, started here) builds the adapters
the in-process path builds, into an S3-compatible store or a shared directory, and survives losing a worker
node mid-run: nothing missing, nothing written twice, and a rerun builds nothing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import free_port, tiny_llama, wait_for_port
from safetensors import safe_open

from prag import Config, Pipeline, machine
from prag.corpus import read_corpus

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "demo" / "corpus.jsonl"
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP = "127.0.0.2"  # Ray swaps 127.0.0.1 for the machine's address; the rest of 127/8 is loopback too
START_TIMEOUT = 600  # generous: a loaded CI machine starts Ray and loads models slowly


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in a process group of its own, so that the node can be killed whole."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory=100000000", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def node_processes(node: subprocess.Popen) -> list[psutil.Process]:
    """The node's processes, its workers included (Ray puts those in process groups of their own)."""
    try:
        root = psutil.Process(node.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(node: subprocess.Popen) -> None:
    """As if its machine went away."""
    for process in node_processes(node):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()


def freeze_a_busy_node(nodes: list[subprocess.Popen]) -> subprocess.Popen | None:
    """A node whose worker is building a shard, stopped (SIGSTOP) so that it cannot finish it; or None."""
    for node in nodes:
        processes = node_processes(node)
        for process in processes:
            process.suspend()
        if any(_title(process) == "ray::Worker.build" for process in processes):
            return node
        for process in processes:
            process.resume()
    return None


def _title(process: psutil.Process) -> str:
    try:
        return process.cmdline()[0]
    except (psutil.Error, IndexError):
        return ""


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A head (no CPUs: it only coordinates) and two worker nodes of one CPU each, on loopback addresses."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    # token authentication, with a token of its own: the test does not depend on (or write) ~/.ray/auth_token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = dict(os.environ, **s3_server, **auth)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")  # a lost node: ~2 s
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # for the drivers this process starts
    head = start_node(
        [
            "--head",
            f"--port={port}",
            f"--node-ip-address={HEAD_IP}",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ],
        env,
        temp / "head.log",
    )
    workers: list[subprocess.Popen] = []
    try:
        wait_for_port(port, HEAD_IP, START_TIMEOUT, head)
        for i in range(2):  # one after the other: nodes starting together on one machine can pick the same ports
            workers.append(
                start_node(
                    [f"--address={HEAD_IP}:{port}", f"--node-ip-address=127.0.0.{3 + i}", "--num-cpus=1"],
                    env,
                    temp / f"worker{i}.log",
                )
            )
            wait_for_nodes(f"{HEAD_IP}:{port}", i + 2, env)
        yield {"address": f"{HEAD_IP}:{port}", "workers": workers, "env": env}
    finally:
        for node in [*workers, head]:
            kill_node(node)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_nodes(address: str, count: int, env: dict) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if status.stdout.count(" node_") >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes: {status.stdout}{status.stderr}")


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    """A tiny random model of the default architecture saved as a model directory (every worker loads it from
    there), a config that makes its augmentation cheap but real, and the in-process adapters to compare with."""
    root = tmp_path_factory.mktemp("distributed")
    model = tiny_llama(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    config = Config()
    config.model.name = str(root / "model")
    # one dtype in every process: "auto" times bf16 against fp32 per process, and a worker could choose otherwise
    config.model.dtype = "float32"
    # answer-first QA: the answers come from the passage, and a random model's question text is accepted often
    # enough that documents get real, sampled training sequences
    config.augment.qa_style = "answer_first"
    config.augment.rewrites = 0
    config.augment.qa_pairs = 2
    config.augment.attempts = 1
    config.augment.qa_tokens_per_pair = 8
    config.augment.batch_size = 1  # shards of 4 documents: 3 shards for 2 workers
    config.train.docs_per_batch = 2
    config.train.compile = "off"
    config.train.store_dtype = "float32"  # compare at float32 precision
    passages = read_corpus(CORPUS)[:12]
    reference = Pipeline(root / "reference", config)
    with machine.using_threads(1):  # as each Ray worker of one CPU: the same float operations, the same sampled text
        assert reference.parameterize(passages, show_progress=False) == len(passages)
    trained = [p for p in passages if reference.augmentations.get(p.id).qa]
    assert len(trained) >= len(passages) // 2, "the test needs documents with training sequences"
    return {"root": root, "config": config, "passages": passages, "reference": reference}


def assert_same_adapters(pipeline: Pipeline, setup: dict) -> None:
    reference = setup["reference"]
    for p in setup["passages"]:
        assert pipeline.augmentations.get(p.id) == reference.augmentations.get(p.id)
        ours, theirs = pipeline.adapters.get(p.id), reference.adapters.get(p.id)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_two_workers_build_the_in_process_adapters_into_s3(ray_cluster, setup, s3_bucket):
    from prag.distributed import parameterize_on_ray

    pipeline = Pipeline(setup["root"] / "home-s3", setup["config"], store=f"{s3_bucket}/store")
    built = parameterize_on_ray(pipeline, setup["passages"], ray_cluster["address"], show_progress=False)
    assert built == len(setup["passages"]) == pipeline.adapters.count()
    assert_same_adapters(pipeline, setup)
    initial = setup["reference"].adapters.get(setup["passages"][0].id)
    assert any(  # training moved the documents that had sequences away from the shared initialization
        not torch.equal(pipeline.adapters.get(p.id)["down_proj.B"], initial["down_proj.B"]) for p in setup["passages"]
    )
    assert parameterize_on_ray(pipeline, setup["passages"], ray_cluster["address"], show_progress=False) == 0


def test_losing_a_worker_node_mid_run_loses_nothing_and_writes_nothing_twice(ray_cluster, setup):
    """The command line on the cluster; a worker node is killed once the first adapters are stored."""
    home, store = setup["root"] / "home-shared", setup["root"] / "shared-store"
    ids = setup["root"] / "ids.txt"
    ids.write_text("\n".join(p.id for p in setup["passages"]) + "\n")
    config_file = setup["root"] / "config.json"
    config_file.write_text(json.dumps(setup["config"].to_dict()))
    Pipeline(home, setup["config"]).index(CORPUS, show_progress=False)
    command = [sys.executable, "-m", "prag.cli", "parameterize", "--home", str(home), "--store", str(store)]
    command += ["--config", str(config_file), "--ids", str(ids), "--ray", ray_cluster["address"], "--quiet"]
    pipeline = Pipeline(home, setup["config"], store=store)

    run = subprocess.Popen(command, env=ray_cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, lost = time.monotonic() + START_TIMEOUT, None
    while lost is None and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if pipeline.adapters.count() > 0:  # training has begun: kill a node in the middle of a shard
            lost = freeze_a_busy_node(ray_cluster["workers"])
    stored_before_kill = pipeline.adapters.count()
    assert lost is not None, (
        f"no worker node was seen building a shard (run exit code {run.poll()}, "
        f"{stored_before_kill} adapters stored, {time.monotonic() - deadline + START_TIMEOUT:.0f} s)"
    )
    kill_node(lost)
    stdout, stderr = run.communicate(timeout=START_TIMEOUT)
    output = f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert run.returncode == 0, output
    assert 0 < stored_before_kill < len(setup["passages"]), output
    assert "a worker died" in stderr, output  # the lost worker's shard went back to the queue
    assert f"{len(setup['passages'])} passages: {len(setup['passages'])} parameterized now" in stdout, output

    # nothing missing, each document's adapter once (and no temporary file that a dying writer could leave
    # looks like one), the same adapters as in-process
    files = sorted((store / "adapters").rglob("*.safetensors"))
    written_for = []
    for f in files:
        with safe_open(str(f), "pt") as opened:
            written_for.append(opened.metadata()["doc_id"])
    assert sorted(written_for) == sorted(p.id for p in setup["passages"])
    assert_same_adapters(pipeline, setup)

    # a rerun finds everything stored and writes nothing
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    rerun = subprocess.run(command, env=ray_cluster["env"], capture_output=True, text=True, timeout=START_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(setup['passages'])} passages: 0 parameterized now" in rerun.stdout
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == stamps
