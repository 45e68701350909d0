"""DyPRAG's parameter translator: shapes on any architecture, it learns LoRAs, it round-trips through its file,
it resumes, and a dyprag answer never augments or trains."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import Server, make_workspace, prag_env

from prag import Config, Pipeline, lora
from prag import translator as dyprag
from prag.cli import main
from prag.config import LoRAConfig, TrainConfig, TranslatorConfig
from prag.corpus import Passage, read_corpus
from prag.parameterize import IGNORE, Sequence, train_adapters

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
PASSAGES = read_corpus(DEMO / "corpus.jsonl")[:4]
# a random model's augmentations do not matter here: keep them short
FAST_BUILD = {"augment": {"rewrite_max_tokens": 24, "qa_tokens_per_pair": 12, "attempts": 1}}


def document_sequences(llm, passage: Passage, n: int = 2) -> list[Sequence]:
    """Training sequences made of the passage's own tokens, the second half of each labelled."""
    ids = llm.tokenizer.encode(passage.contents, add_special_tokens=False)[:24]
    return [Sequence(ids[i:], [IGNORE] * (len(ids[i:]) // 2) + ids[i:][len(ids[i:]) // 2 :]) for i in range(n)]


@pytest.mark.parametrize(
    ("fixture", "targets"),
    [("tiny_llm", ("gate_proj", "up_proj", "down_proj")), ("tiny_qwen2", ("q_proj", "gate_proj", "down_proj"))],
)
def test_generated_loras_have_the_stored_shapes_and_act(fixture, targets, request):
    """The default architecture (Llama) and Qwen2, FFN and attention projections: a generated adapter has a trained
    one's keys and shapes, merges, stacks and injects as one, and changes the model's output."""
    llm = request.getfixturevalue(fixture)
    lora_model = lora.LoRAModel(llm.model, targets)
    shapes = lora_model.shapes(rank=2)
    translator = dyprag.Translator(shapes, llm.model.config.hidden_size, hidden=8, init_std=0.2)
    stacked = translator(torch.randn(3, llm.model.config.hidden_size))
    assert {k: tuple(v.shape) for k, v in stacked.items()} == {k: (s[0], 3, *s[1:]) for k, s in shapes.items()}

    generated = translator.adapters(llm, PASSAGES[:3])
    assert len(generated) == 3
    for adapter in generated:
        assert {k: tuple(v.shape) for k, v in adapter.items()} == shapes
    assert not torch.allclose(generated[0]["down_proj.B"], generated[1]["down_proj.B"])  # one per document

    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        base = llm.model(input_ids=ids).logits
        lora_model.inject(lora.merge(generated[:2]), scale=16.0)
        merged = llm.model(input_ids=ids).logits
        lora_model.inject(lora.stack_padded([lora.merge(generated[:2]), None]), scale=16.0)
        batched = llm.model(input_ids=ids).logits
        lora_model.clear()
    assert not torch.allclose(base[0], merged[0], atol=1e-3)
    torch.testing.assert_close(batched[0], merged[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], base[1], rtol=1e-4, atol=1e-4)


def test_a_tiny_translator_overfits_two_documents(tiny_llm):
    """Trained LoRAs of two documents as targets, with the full loss (LM + KL + MSE): the squared error to the
    targets falls a lot, and each document's generated LoRA is nearer its own trained LoRA than the other's."""
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    documents = PASSAGES[:2]
    sequences = [document_sequences(tiny_llm, p) for p in documents]
    trained = train_adapters(
        tiny_llm, lora_model, sequences, LoRAConfig(), TrainConfig(lr=5e-2, epochs=3), show_progress=False
    )
    targets = {p.id: adapter for p, adapter in zip(documents, trained, strict=True)}
    translator = dyprag.Translator(lora_model.shapes(2), tiny_llm.model.config.hidden_size, hidden=16, init_std=0.02)
    cfg = TranslatorConfig(lr=1e-2, epochs=100)
    examples = [dyprag.Example(p, s) for p, s in zip(documents, sequences, strict=True)]

    def distance(a, b):
        return sum((a[k] - b[k].float()).pow(2).sum() for k in a)

    def error():
        generated = translator.adapters(tiny_llm, documents)
        return sum(distance(g, targets[p.id]) for p, g in zip(documents, generated, strict=True))

    before = error()
    record = dyprag.train(
        tiny_llm, lora_model, translator, examples, targets.__getitem__, cfg, scale=16.0, show_progress=False
    )
    assert record["steps"] == 200 and len(record["losses"]["mse"]) == 200
    assert error() < 0.01 * before
    assert all(record["losses"][name][-1] > 0 for name in ("lm", "kl"))  # every term was computed
    for own, other in ((0, 1), (1, 0)):
        [generated] = translator.adapters(tiny_llm, [documents[own]])
        target, wrong = targets[documents[own].id], targets[documents[other].id]
        assert distance(generated, target) < 0.5 * distance(generated, wrong)


def test_a_frozen_prefix_is_read_without_the_generated_lora(tiny_llm):
    """Under `train.prefix = "frozen"` (how the trained LoRAs were trained) a step reads the sequences' fixed
    start without any document's LoRA and runs the rest on top of it: with a zero LoRA that is exactly the
    whole-sequence loss, with a real one it is not."""
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    start = tiny_llm.tokenizer.encode(
        "Answer each question below with a short phrase taken from the passages, as in these worked examples."
    )[:20]
    ids = tiny_llm.tokenizer.encode(PASSAGES[0].contents, add_special_tokens=False)[:16]
    sequences = [
        Sequence(start + ids[i:], [IGNORE] * (len(start) + 4) + ids[i + 4 :], fixed=len(start)) for i in (0, 2)
    ]
    example = dyprag.Example(PASSAGES[0], sequences)
    cfg = TranslatorConfig(kl_weight=0.0, mse_weight=0.0)
    frozen = dyprag._frozen_prefix(tiny_llm, lora_model, sequences, None, 1.0, {})
    assert frozen is not None and frozen.length == len(start)

    def lm(translator, prefix):
        [adapter] = translator.adapters(tiny_llm, [PASSAGES[0]])  # the target: only the LM term is weighed
        args = (tiny_llm, lora_model, translator, example, lambda _: adapter, cfg)
        return dyprag._step_losses(*args, 1.0, lambda a: a, 2048, prefix)["lm"].item()

    shapes, dim = lora_model.shapes(2), tiny_llm.model.config.hidden_size
    zero = dyprag.Translator(shapes, dim, hidden=8, init_std=0.0)
    assert lm(zero, frozen) == pytest.approx(lm(zero, None), rel=1e-5)
    real = dyprag.Translator(shapes, dim, hidden=8, init_std=0.1)  # a LoRA that changes, not swamps, the model
    assert abs(lm(real, None) - lm(zero, None)) > 1e-3  # the LoRA acts...
    assert abs(lm(real, frozen) - lm(real, None)) > 1e-4  # ...and not on the frozen prefix (float error: ~1e-6)


def test_a_fixed_start_shared_by_documents_is_read_once(tiny_llm):
    """Translator training reads a protocol's fixed start once for all its documents, not once a step; a
    document with another start gets its own, and each is what reading it afresh gives."""
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    start = tiny_llm.tokenizer.encode(
        "Answer each question below with a short phrase taken from the passages, as in these worked examples."
    )
    other = tiny_llm.tokenizer.encode(
        "Write the passage below again in other words, keeping every name, date, place and fact that it states."
    )

    def sequences(head, passage):
        ids = tiny_llm.tokenizer.encode(passage.contents, add_special_tokens=False)[:12]
        return [Sequence(head + ids, [IGNORE] * (len(head) + 2) + ids[2:], fixed=len(head))]

    read: dict = {}
    first = dyprag._frozen_prefix(tiny_llm, lora_model, sequences(start, PASSAGES[0]), None, 1.0, read)
    again = dyprag._frozen_prefix(tiny_llm, lora_model, sequences(start, PASSAGES[1]), None, 1.0, read)
    third = dyprag._frozen_prefix(tiny_llm, lora_model, sequences(other, PASSAGES[1]), None, 1.0, read)
    assert again is first and third is not first and len(read) == 2
    for frozen, head in ((first, start), (third, other)):
        fresh = dyprag._frozen_prefix(tiny_llm, lora_model, sequences(head, PASSAGES[2]), None, 1.0, {})
        assert frozen.length == fresh.length == len(head)
        for a, b in zip(frozen.cache.layers, fresh.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_save_and_load_give_identical_outputs(tiny_qwen2, tmp_path):
    lora_model = lora.LoRAModel(tiny_qwen2.model, ("gate_proj", "up_proj", "down_proj"))
    translator = dyprag.Translator(lora_model.shapes(4), tiny_qwen2.model.config.hidden_size, hidden=8, init_std=0.1)
    path = tmp_path / "t" / "translator.safetensors"
    dyprag.save(translator, path, {"documents": 2})
    loaded, record = dyprag.load(path)
    assert record == {"documents": 2} and loaded.shapes == translator.shapes
    for a, b in zip(translator.adapters(tiny_qwen2, PASSAGES), loaded.adapters(tiny_qwen2, PASSAGES), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "bogus.safetensors").write_bytes(path.read_bytes().replace(b"architecture", b"architectur_"))
    with pytest.raises(ValueError, match="not a translator file"):
        dyprag.load(tmp_path / "bogus.safetensors")


def test_an_interrupted_training_resumes_to_the_same_translator(tiny_llm, tmp_path):
    lora_model = lora.LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(2)
    g = torch.Generator().manual_seed(0)
    targets = {p.id: {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()} for p in PASSAGES}
    examples = [dyprag.Example(p, document_sequences(tiny_llm, p, 1)) for p in PASSAGES]
    cfg = TranslatorConfig(lr=1e-2, epochs=2, checkpoint_every=3)

    def fresh():
        return dyprag.Translator(shapes, tiny_llm.model.config.hidden_size, hidden=8, init_std=0.02)

    whole = fresh()
    record = dyprag.train(tiny_llm, lora_model, whole, examples, targets.__getitem__, cfg, 16.0, show_progress=False)

    calls = []

    def crashing(doc_id):  # the 5th document's LoRA cannot be read: the run dies after a checkpoint at 3
        calls.append(doc_id)
        if len(calls) == 5:
            raise OSError("disk gone")
        return targets[doc_id]

    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError, match="disk gone"):
        dyprag.train(tiny_llm, lora_model, fresh(), examples, crashing, cfg, 16.0, checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    resumed = fresh()
    again = dyprag.train(tiny_llm, lora_model, resumed, examples, targets.__getitem__, cfg, 16.0, checkpoint=checkpoint)
    assert again["losses"] == record["losses"] and again["steps"] == 8
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    with pytest.raises(ValueError, match="checkpoint of another training run"):
        dyprag.train(tiny_llm, lora_model, fresh(), examples[:2], targets.__getitem__, cfg, 16.0, checkpoint=checkpoint)


def _pipeline(home, llm) -> Pipeline:
    config = Config.from_dict({**FAST_BUILD, "answer": {"top_k": 2, "max_new_tokens": 6}})
    return Pipeline(home, config, llm=llm)


def test_a_dyprag_answer_never_augments_or_trains(tiny_llm, tmp_path):
    pipeline = _pipeline(tmp_path / "home", tiny_llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    with pytest.raises(ValueError, match="prag translator train"):
        pipeline.answer("Who is George Rankin?", "dyprag")

    trained_on = pipeline.retrieve("What is George Rankin's occupation?")
    record = pipeline.train_translator(trained_on, ["q0"], show_progress=False)
    assert record["parameterized_first"] == 2 and record["steps"] == 2 and pipeline.translator_path.exists()
    assert pipeline.translator_record()["question_ids"] == ["q0"]
    stored = (pipeline.adapters.count(), sum(1 for _ in pipeline.augmentations))
    offline = dict(pipeline.offline_seconds)

    question = "Who directed the film Citizen Kane?"
    modes = ("dyprag", "dyprag-combine", "dyprag-unrelated", "dyprag-combine-unrelated")
    answers = {mode: pipeline.answer(question, mode) for mode in modes}
    retrieved = answers["dyprag"].passages
    assert retrieved and not any(pipeline.adapters.has(p.id) for p in retrieved)  # not parameterized before
    for mode, answer in answers.items():
        assert answer.text and answer.timings["translate"] > 0 and "parameterize" not in answer.timings, mode
        assert answer.missing == []
    assert answers["dyprag"].lora_passages == retrieved == answers["dyprag-combine"].lora_passages
    assert not {p.id for p in retrieved} & {p.id for p in answers["dyprag-unrelated"].lora_passages}
    assert answers["dyprag-combine-unrelated"].passages == retrieved  # its own passages in the prompt...
    assert not {p.id for p in retrieved} & {p.id for p in answers["dyprag-combine-unrelated"].lora_passages}
    # nothing was augmented, trained or stored for these documents
    assert (pipeline.adapters.count(), sum(1 for _ in pipeline.augmentations)) == stored
    assert pipeline.offline_seconds == offline
    assert not any(pipeline.adapters.has(p.id) or pipeline.augmentations.has(p.id) for p in retrieved)

    # generated LoRAs go through the batched per-row path like trained ones: a dyprag row in a batch with other
    # modes gets the adapter it gets alone
    batch = [pipeline.prepare(question, mode) for mode in ("closed", "dyprag", "prag")]
    alone = pipeline.prepare(question, "dyprag")
    pipeline.translate([alone])
    pipeline.generate(batch)
    assert batch[0].adapter is None
    for key, value in alone.adapter.items():
        torch.testing.assert_close(batch[1].adapter[key], value, rtol=1e-4, atol=1e-5)
        assert value.shape[1 if key.endswith(".A") else 2] == 2  # two documents of rank 2, averaged (rank 2)


def test_cli_trains_a_translator_then_answers_and_evaluates_in_dyprag_modes(tiny_llm, tmp_path, monkeypatch, capsys):
    home = str(tmp_path / "home")
    monkeypatch.setattr("prag.llm.LLM.load", classmethod(lambda cls, config: tiny_llm))
    sets = [a for k, v in FAST_BUILD["augment"].items() for a in ("--set", f"augment.{k}={v}")]
    common = ["--home", home, "--quiet", *sets]
    questions = str(DEMO / "questions.jsonl")
    assert main(["index", str(DEMO / "corpus.jsonl"), *common]) == 0
    assert main(["ask", "Who is George Rankin?", "--mode", "dyprag", *common]) == 2
    assert "prag translator train --dataset" in capsys.readouterr().err

    train = ["translator", "train", "--dataset", questions, "--limit", "2", "--top-k", "2", *common]
    assert main(train) == 2  # the tune slice of the 8 demo questions (100 on) is empty
    assert "no questions in slice 'tune'" in capsys.readouterr().err
    assert main([*train, "--slice", "all"]) == 0
    out = capsys.readouterr().out
    assert "translator trained on" in out and "mse loss" in out and "s per document" in out
    [path] = Path(home).glob("translators/*/translator.safetensors")
    assert not list(path.parent.glob("checkpoint*"))
    _, record = dyprag.load(path)
    assert record["question_ids"] == ["popqa-0", "popqa-2"] and record["documents"] == len(record["document_ids"])
    assert record["config"] == json.loads(json.dumps(Config().to_dict()["translator"]))
    assert main([*train, "--slice", "all"]) == 2 and "--restart" in capsys.readouterr().err
    assert main(["stats", *common]) == 0
    assert json.loads(capsys.readouterr().out)["translator"]["documents"] == record["documents"]

    assert main(["ask", "Who is George Rankin?", "--mode", "dyprag-combine", *common]) == 0
    assert "answer:" in capsys.readouterr().out
    out_dir = tmp_path / "eval"
    evaluate = ["eval", "--dataset", questions, "--modes", "rag,dyprag,dyprag-combine,dyprag-unrelated", "--top-k", "2"]
    assert main([*evaluate, "--offset", "2", "--limit", "3", "--out", str(out_dir), *common]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"rag", "dyprag", "dyprag-combine", "dyprag-unrelated"}
    assert metrics["offline"]["documents_parameterized"] == 0 and "dyprag - dyprag-unrelated" in metrics["comparisons"]
    assert metrics["offline"]["translator"]["documents"] == record["documents"]
    assert main([*evaluate, "--limit", "1", "--out", str(out_dir), *common]) == 2  # popqa-0 trained the translator
    assert "trained the translator" in capsys.readouterr().err


def test_the_service_answers_in_dyprag_modes_without_building_anything(tiny_model_dir, tmp_path):
    """A real server: the generated LoRAs are made in the batcher's thread (the model's), rows of several modes share
    a batch, and the documents a dyprag question retrieves are never queued for parameterization."""
    home = make_workspace(tmp_path / "home", tiny_model_dir)
    train = [sys.executable, "-m", "prag.cli", "translator", "train", "--home", str(home), "--quiet"]
    train += ["--dataset", str(DEMO / "questions.jsonl"), "--slice", "all", "--limit", "1", "--top-k", "2"]
    subprocess.run(train, check=True, env=prag_env(), capture_output=True, timeout=600)
    server = Server(home).start()
    try:
        question = "Who directed the film Citizen Kane?"
        with ThreadPoolExecutor(3) as pool:
            bodies = [{"question": question, "mode": mode, "top_k": 2} for mode in ("dyprag", "dyprag-combine", "rag")]
            responses = list(pool.map(lambda body: server.post("/v1/answer", body), bodies))
        for response in responses:
            assert response.status_code == 200, response.text
        dyprag_answer, combined, rag = (r.json() for r in responses)
        retrieved = [p["id"] for p in rag["passages"]]
        assert dyprag_answer["lora_documents"] == retrieved == combined["lora_documents"]
        assert dyprag_answer["missing_adapters"] == [] and dyprag_answer["timings_ms"]["load_merge"] > 0
        for doc_id in retrieved:
            assert server.get(f"/v1/documents/{doc_id}").json()["status"] == "not_built"
    finally:
        server.stop()


def test_generated_loras_are_cached_by_document_and_bounded():
    from prag.corpus import Passage
    from prag.translator import GeneratedCache

    def adapter(value: float) -> dict:
        return {"up_proj.A": torch.full((2, 2, 4), value), "up_proj.B": torch.full((2, 4, 2), value)}

    size = 2 * 16 * 4  # two float32 tensors of 16 elements
    cache = GeneratedCache(max_bytes=2 * size)
    a, b, c = (Passage(f"d{i}", f"title {i}", f"text {i}") for i in range(3))
    batch = torch.zeros(3, 2, 2, 4)
    cache.put(a, {"up_proj.A": batch[0], "up_proj.B": torch.zeros(2, 4, 2)})
    assert cache.get(a)["up_proj.A"].untyped_storage().nbytes() == 16 * 4  # a copy, not a view of the batch
    cache.put(b, adapter(2.0))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, adapter(3.0))  # over budget: the least recently used (b) goes
    assert cache.get(b) is None and cache.get(c)["up_proj.A"][0, 0, 0] == 3.0 and cache.bytes == 2 * size
    assert cache.get(Passage("d2", "title 2", "text changed")) is None  # a changed text is another document
    GeneratedCache(max_bytes=size - 1).put(a, adapter(1.0))  # larger than the whole budget: not kept, no error


def test_a_document_is_translated_once_while_cached(tiny_llm, tmp_path):
    pipeline = _pipeline(tmp_path / "home", tiny_llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    pipeline.train_translator(pipeline.retrieve("What is George Rankin's occupation?"), ["q0"], show_progress=False)
    question = "Who directed the film Citizen Kane?"
    first = pipeline.prepare(question, "dyprag")
    pipeline.translate([first])
    assert {p.id for p in first.translate} <= {key[0] for key in pipeline.generated.entries}
    with torch.no_grad():  # a changed translator: only a document translated again would see it
        for parameter in pipeline.translator.parameters():
            parameter.mul_(3.0)
    again = pipeline.prepare(question, "dyprag-combine")
    pipeline.translate([again])
    for key, value in first.adapter.items():
        torch.testing.assert_close(again.adapter[key], value)
    pipeline.generated.clear()
    fresh = pipeline.prepare(question, "dyprag")
    pipeline.translate([fresh])
    assert any(not torch.allclose(fresh.adapter[key], value) for key, value in first.adapter.items())


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_a_questions_generated_loras_are_averaged_as_dyprag_does_or_summed(tiny_llm, tmp_path, merge):
    """translator.merge=mean (the default, DyPRAG's inference): A and B each averaged over the top-k
    documents, one LoRA of the documents' rank; sum: the deltas summed, as trained LoRAs are merged."""
    pipeline = _pipeline(tmp_path / "home", tiny_llm)
    pipeline.config.translator.merge = merge
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    pipeline.train_translator(pipeline.retrieve("What is George Rankin's occupation?"), ["q0"], show_progress=False)
    prepared = pipeline.prepare("Who directed the film Citizen Kane?", "dyprag")
    pipeline.translate([prepared])
    generated = [pipeline.generated.get(p) for p in prepared.translate]
    assert len(generated) == pipeline.config.answer.top_k > 1
    x = torch.randn(5, tiny_llm.model.config.hidden_size)
    delta = prepared.adapter["up_proj.B"][0] @ prepared.adapter["up_proj.A"][0] @ x.T
    if merge == "mean":
        assert prepared.adapter["up_proj.A"].shape == generated[0]["up_proj.A"].shape
        mean_b = sum(g["up_proj.B"][0] for g in generated) / len(generated)
        mean_a = sum(g["up_proj.A"][0] for g in generated) / len(generated)
        torch.testing.assert_close(delta, mean_b @ mean_a @ x.T)
    else:
        torch.testing.assert_close(delta, sum(g["up_proj.B"][0] @ g["up_proj.A"][0] @ x.T for g in generated))
