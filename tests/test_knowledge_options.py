"""Options that try to make document LoRAs carry facts: a format adapter beside them, attention targets,
the grounded and document losses, the merge scale, subject-naming questions (tiny models, no download)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from prag import Config, Pipeline, lora
from prag.augment import Augmentation, _accept_question, answer_first_prompt
from prag.config import AugmentConfig, LoRAConfig, TrainConfig
from prag.corpus import Passage
from prag.llm import LLM
from prag.locality import PROBES, locality_probes
from prag.lora import LoRAModel, init_adapter
from prag.parameterize import IGNORE, Sequence, label_logits, prompt_start, train_adapters, training_sequences
from prag.pipeline import question_match
from prag.prompt import AnswerFormat

PASSAGE = Passage("d1", "Ada Lovelace", "Ada Lovelace was an English mathematician who died in London in 1852.")
AUG = Augmentation(
    "d1",
    rewrites=["In 1852 the English mathematician Ada Lovelace died in London."],
    qa=[{"question": "Where did Ada Lovelace die?", "answer": "in the city of London"}],
)


def docs(seed: int, n: int = 2) -> list[list[Sequence]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 2000, (16,), generator=g).tolist()
        out.append([Sequence(ids, [IGNORE] * 8 + ids[8:])])
    return out


def test_attention_projections_can_carry_a_lora(tiny_llm):
    targets = ("q_proj", "v_proj", "down_proj")
    model = LoRAModel(tiny_llm.model, targets)
    adapter = train_adapters(
        tiny_llm, model, docs(1, 1), LoRAConfig(target_modules=targets), TrainConfig(lr=1e-2), show_progress=False
    )[0]
    assert adapter["q_proj.A"].shape[0] == 2 and adapter["q_proj.B"].abs().sum() > 0  # attention was trained
    ids = torch.tensor([docs(2, 1)[0][0].input_ids])
    with torch.no_grad():
        plain = tiny_llm.model(ids).logits
        model.inject(adapter, 16.0)
        injected = tiny_llm.model(ids).logits
        model.clear()
    assert not torch.allclose(plain, injected)
    with pytest.raises(ValueError, match="has no linear .w_proj."):
        LoRAModel(tiny_llm.model, ("w_proj",))


def test_a_format_adapter_is_fixed_and_documents_learn_beside_it(tiny_llm):
    model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    config, train = LoRAConfig(), TrainConfig(lr=1e-2, epochs=2)
    shapes = model.shapes(config.rank)
    # a base with B = 0 adds nothing: training beside it equals training alone
    zero = init_adapter(shapes, seed=7)
    alone = train_adapters(tiny_llm, model, docs(3), config, train, show_progress=False)
    beside_zero = train_adapters(tiny_llm, model, docs(3), config, train, show_progress=False, base=zero)
    for a, b in zip(alone, beside_zero, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # a real base changes what the documents learn, and is itself never trained
    base = {k: (v + 0.05 if k.endswith(".B") else v) for k, v in zero.items()}
    frozen = {k: v.clone() for k, v in base.items()}
    beside = train_adapters(tiny_llm, model, docs(3), config, train, show_progress=False, base=base)
    assert all(torch.equal(base[k], frozen[k]) for k in base)
    assert not torch.allclose(beside[0]["down_proj.B"], alone[0]["down_proj.B"])


def test_the_format_adapter_is_injected_in_every_mode(tiny_llm, tmp_path):
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "data" / "demo" / "corpus.jsonl"
    model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    base = {k: v + 0.05 if k.endswith(".B") else v for k, v in init_adapter(model.shapes(2), 1).items()}
    path = tmp_path / "format.safetensors"
    save_file(base, str(path))
    config = Config()
    config.lora.base = str(path)
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm)
    assert "-base" in pipeline.adapters.root.name  # a different base is a different store
    pipeline.index(demo, show_progress=False)
    pipeline.config.answer.max_new_tokens = 2
    seen = []  # what the first FFN projection adds while the model runs
    layer = pipeline.lora_model.layers["down_proj"][0]
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(None if m.A is None else m.B.clone()))
    try:
        pipeline.answer("Who is George Rankin?", "closed")
        pipeline.answer("Who is George Rankin?", "rag", top_k=1)
    finally:
        hook.remove()
    assert seen and all(b is not None and torch.equal(b, base["down_proj.B"][0]) for b in seen)
    assert layer.A is None  # cleared after answering


def _format_adapter(tiny_llm, path, rank=2, metadata=None):
    shapes = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj")).shapes(rank)
    adapter = {k: v + 0.05 if k.endswith(".B") else v for k, v in init_adapter(shapes, 1).items()}
    save_file(adapter, str(path), metadata=metadata)
    return adapter


def test_a_format_adapter_keeps_its_delta_under_other_lora_settings(tiny_llm, tmp_path):
    path = tmp_path / "format.safetensors"
    trained = _format_adapter(tiny_llm, path, metadata={"scale": "16.0"})  # rank 2, alpha 32, as `prag warmup` records
    config = Config()
    config.lora.rank, config.lora.alpha, config.lora.base = 8, 64.0, str(path)  # documents' LoRAs at scale 8
    config.lora.target_modules = ("q_proj", "gate_proj", "up_proj", "down_proj")  # and on attention too
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm)
    base = pipeline.base_adapter
    for name in ("gate_proj", "down_proj"):
        assert torch.allclose(lora.delta(base, name, 0, 8.0), lora.delta(trained, name, 0, 16.0))
    assert base["q_proj.A"].shape[1] == 0 and base["q_proj.B"].shape[2] == 0  # a projection it leaves alone
    # beside documents' LoRAs on every target, merged and injected, the model runs
    document = {k: v + 0.01 for k, v in init_adapter(pipeline.lora_model.shapes(8), 2).items()}
    merged = pipeline.merge([document, document])
    assert merged["q_proj.A"].shape[1] == 16 and merged["down_proj.A"].shape[1] == 2 + 16
    pipeline.lora_model.inject(merged, config.lora.scale)
    try:
        logits = tiny_llm.model(torch.tensor([[1, 2, 3]])).logits
    finally:
        pipeline.lora_model.clear()
    assert torch.isfinite(logits).all()

    # a file without a recorded scale (written before it was recorded) is taken at the current one
    save_file(trained, str(path))
    unscaled = Pipeline(tmp_path / "home2", config, llm=tiny_llm).base_adapter
    assert torch.equal(unscaled["down_proj.B"], trained["down_proj.B"])


def test_warmup_adapters_that_do_not_fit_are_named(tiny_llm, tmp_path):
    path = tmp_path / "warm.safetensors"
    _format_adapter(tiny_llm, path, rank=2)
    config = Config()
    config.lora.init, config.lora.rank = str(path), 4  # documents would start from a rank-2 LoRA
    with pytest.raises(ValueError, match=r"needs lora.rank=4 .* it has rank 2"):
        _ = Pipeline(tmp_path / "home", config, llm=tiny_llm).initial_adapter
    config = Config()
    config.lora.base, config.lora.target_modules = str(path), ("down_proj",)
    with pytest.raises(ValueError, match=r"trained on \['gate_proj', 'up_proj'\], which lora.target_modules"):
        _ = Pipeline(tmp_path / "home", config, llm=tiny_llm).base_adapter
    save_file({"down_proj.A": torch.zeros(2, 2, 2)}, str(path))  # no B
    with pytest.raises(ValueError, match=r"not a LoRA adapter .* it holds \['down_proj.A'\]"):
        _ = Pipeline(tmp_path / "home", config, llm=tiny_llm).base_adapter
    _format_adapter(tiny_llm, path, rank=2)
    wrong = {k: v[:, :, :-1].contiguous() if k.endswith(".A") else v for k, v in load_file(str(path)).items()}
    save_file(wrong, str(path))
    config = Config()
    config.lora.base = str(path)
    with pytest.raises(ValueError, match="an adapter of another model"):
        _ = Pipeline(tmp_path / "home", config, llm=tiny_llm).base_adapter


def test_merge_scale_and_mixed_dtypes():
    shapes = {"down_proj.A": (2, 2, 8), "down_proj.B": (2, 6, 2)}
    a = {k: v + 0.1 for k, v in init_adapter(shapes, 1).items()}
    b = {k: (v + 0.2).to(torch.bfloat16) for k, v in init_adapter(shapes, 2).items()}
    merged = lora.merge([a, b], [1.0, 0.5])
    expected = lora.delta(a, "down_proj", 1, 2.0) + 0.5 * lora.delta(b, "down_proj", 1, 2.0)
    torch.testing.assert_close(lora.delta(merged, "down_proj", 1, 2.0), expected)
    assert merged["down_proj.B"].dtype == torch.float32
    assert lora.merge([a], [1.0]) is a  # a weight of one is no copy


def _llm(tokenizer) -> LLM:
    return LLM(SimpleNamespace(), tokenizer, "tokenizer only")  # training_sequences only tokenizes


def test_grounded_loss_labels_only_words_of_the_passage(tokenizer):
    llm, fmt = _llm(tokenizer), AnswerFormat()
    seqs = training_sequences(llm, PASSAGE, AUG, TrainConfig(loss_on="grounded"), fmt)
    labelled = [tokenizer.decode([t]) for t in seqs[0].labels if t != IGNORE]
    assert "".join(labelled).split() == ["in", "London"]  # "the city of" is not in the passage; "." no word
    answer = training_sequences(llm, PASSAGE, AUG, TrainConfig(loss_on="answer"), fmt)
    assert sum(t != IGNORE for t in answer[0].labels) > sum(t != IGNORE for t in seqs[0].labels)


def test_document_lm_trains_on_the_passage_and_its_rewrites(tokenizer):
    llm, fmt = _llm(tokenizer), AnswerFormat()
    plain = training_sequences(llm, PASSAGE, AUG, TrainConfig(), fmt)
    with_text = training_sequences(llm, PASSAGE, AUG, TrainConfig(document_lm=True), fmt)
    assert len(with_text) == len(plain) + 2
    for seq, text in zip(with_text[:2], [PASSAGE.contents, AUG.rewrites[0]], strict=True):
        assert tokenizer.decode(seq.input_ids) == text and seq.labels == seq.input_ids


@pytest.mark.parametrize(
    "qa_context, alone, with_text",
    [("reference", [2], [0, 1]), ("none", [0, 1, 2], []), ("both", [0, 1, 2], [0, 1])],
)
def test_qa_context_decides_which_pairs_are_trained_without_the_passage(tokenizer, qa_context, alone, with_text):
    llm, fmt = _llm(tokenizer), AnswerFormat()
    qa = [{"question": f"Question {i}?", "answer": f"answer {i}"} for i in range(3)]
    aug = Augmentation("d1", rewrites=AUG.rewrites, qa=qa)
    seqs = training_sequences(llm, PASSAGE, aug, TrainConfig(qa_context=qa_context), fmt)
    texts = [tokenizer.decode(s.input_ids) for s in seqs]
    asked = lambda i: [t for t in texts if f"Question {i}?" in t]  # noqa: E731
    for i in range(3):
        shown = [t for t in asked(i) if "mathematician" in t]  # the passage or the rewrite in the prompt
        assert len(asked(i)) - len(shown) == (i in alone)
        assert len(shown) == (2 if i in with_text else 0)  # with the passage, and with the one rewrite
    assert len(seqs) == len(alone) + 2 * len(with_text)


def test_answer_first_questions_can_be_required_to_name_the_subject():
    prompt = answer_first_prompt("1852", PASSAGE, name_subject=True)
    assert prompt.endswith('The question must name "Ada Lovelace".')
    assert "must name" not in answer_first_prompt("1852", PASSAGE)
    config, rejected, result = AugmentConfig(qa_style="answer_first", name_subject=True), Counter(), Augmentation("d1")
    _accept_question("When did she die?", "1852", PASSAGE, result, rejected, config)
    _accept_question("When did Ada Lovelace die?", "1852", PASSAGE, result, rejected, config)
    assert rejected == {"subject_not_named": 1} and result.qa == [
        {"question": "When did Ada Lovelace die?", "answer": "1852"}
    ]


def test_locality_adds_probes_distilled_from_the_model_itself(tokenizer):
    llm, fmt = _llm(tokenizer), AnswerFormat()
    plain = training_sequences(llm, PASSAGE, AUG, TrainConfig(), fmt)
    seqs = training_sequences(llm, PASSAGE, AUG, TrainConfig(locality=3), fmt)
    probes = seqs[len(plain) :]
    assert len(probes) == 3 and all(s.teacher is None for s in plain)
    for probe in probes:
        # asked alone, the teacher reads exactly what the student reads: the loss is KL to the frozen model
        assert probe.teacher.input_ids == probe.input_ids and probe.teacher.labels == probe.labels
        assert "mathematician" not in tokenizer.decode(probe.input_ids)

    def questions(passage: Passage) -> list[str]:
        seqs = training_sequences(llm, passage, AUG, TrainConfig(locality=3), fmt)
        return [tokenizer.decode(s.input_ids) for s in seqs[len(plain) :]]

    # a document's probes depend on its id only, never on the documents trained beside it
    assert questions(PASSAGE) == [tokenizer.decode(s.input_ids) for s in probes]
    assert questions(Passage("d2", PASSAGE.title, PASSAGE.contents)) != questions(PASSAGE)
    assert locality_probes("d1", 3) == locality_probes("d1", 3) and len(locality_probes("d1", 999)) == len(PROBES)
    # asked with the passage in the prompt as well (as `combine` asks): the same probes, twice
    both = training_sequences(llm, PASSAGE, AUG, TrainConfig(locality=3, locality_context="both"), fmt)[len(plain) :]
    texts = [tokenizer.decode(s.input_ids) for s in both]
    assert len(both) == 6 and sum("mathematician" in t for t in texts) == 3
    assert [t for t in texts if "mathematician" not in t] == questions(PASSAGE)
    with pytest.raises(ValueError, match="train.locality"):
        Config.from_dict({"train": {"locality": -1}}).validate()


def test_locality_pulls_the_probes_answers_back_to_the_frozen_models(tiny_llm):
    """Trained from a LoRA that changes every answer, a document's probes alone bring the model's token
    distributions on them back toward those of the model without any LoRA."""
    model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    fmt, config, train = AnswerFormat(), LoRAConfig(), TrainConfig(lr=1e-3, epochs=60, qa_context="none", locality=4)
    start = {k: v + 0.05 if k.endswith(".B") else v for k, v in init_adapter(model.shapes(config.rank), 0).items()}
    probes = training_sequences(tiny_llm, PASSAGE, Augmentation("d1"), train, fmt)
    assert len(probes) == 4 and all(s.teacher is not None for s in probes)

    def probe_kl(adapter) -> float:
        with torch.no_grad():
            frozen = torch.log_softmax(label_logits(tiny_llm, probes)[0], -1)
            model.inject(adapter, config.scale)
            tuned = torch.log_softmax(label_logits(tiny_llm, probes)[0], -1)
            model.clear()
        return float((frozen.exp() * (frozen - tuned)).sum(-1).mean())

    trained = train_adapters(tiny_llm, model, [probes], config, train, start, show_progress=False)[0]
    assert probe_kl(trained) < 0.3 * probe_kl(start)


def test_adapters_trained_with_probes_are_keyed_by_the_probe_set(tmp_path):
    from prag import locality

    plain = Pipeline(tmp_path, Config())
    config = Config()
    config.set("train.locality", 6)
    probed = Pipeline(tmp_path, config)
    assert str(probed.adapters.root).endswith(f"p{locality.VERSION}") and probed.adapters.root != plain.adapters.root
    assert not any(a.lower() in ("yes", "no") for _, a in locality.PROBES)  # version 2 dropped the yes/no probes


def test_question_match_is_the_share_of_the_questions_words_one_stored_question_asks():
    question = "Which magazine was started first, Arthur's Magazine or First for Women?"
    assert question_match(question, ["When was Arthur's Magazine started?", "Who founded it?"]) == pytest.approx(3 / 5)
    assert question_match(question, ["Who founded it?", "What is First for Women?"]) == pytest.approx(2 / 5)
    assert question_match(question, ["Where was John Smith born?"]) == 0.0
    assert question_match(question, []) == 0.0  # a document with no stored pairs adds nothing
    assert question_match("Who is it?", ["Where was John Smith born?"]) == 1.0  # no content words: no evidence


def test_matched_merge_weighs_each_stored_lora_by_its_documents_questions(tiny_llm, tmp_path):
    config = Config()
    config.answer.merge = "matched"
    config.answer.lora_scale = 0.5
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm)
    shapes = pipeline.lora_model.shapes(config.lora.rank)
    magazine = Passage("m", "Arthur's Magazine", "Arthur's Magazine (1844-1846) was an American literary periodical.")
    person = Passage("p", "John Smith", "John Smith was born in Ohio.")
    questions = {"m": "When was Arthur's Magazine started?", "p": "Where was John Smith born?"}
    for seed, p in enumerate((magazine, person)):
        pipeline.adapters.put(p.id, {k: v + 0.1 * (seed + 1) for k, v in init_adapter(shapes, seed).items()})
        pipeline.augmentations.put(Augmentation(p.id, qa=[{"question": questions[p.id], "answer": "x"}]))
    question = "Which magazine was started first, Arthur's Magazine or First for Women?"
    stored = [pipeline.adapters.get("m"), pipeline.adapters.get("p")]
    for mode in ("prag", "combine"):
        prepared = pipeline.prepare(question, mode, passages=[magazine, person])
        expected = lora.merge(stored, [0.5 * 3 / 5, 0.0])
        for module in config.lora.target_modules:
            torch.testing.assert_close(
                lora.delta(prepared.adapter, module, 0, 2.0), lora.delta(expected, module, 0, 2.0)
            )
    # a control merges the unrelated LoRAs at the weights of the question's own documents, not at their own (~0)
    prepared = pipeline.prepare(
        question, "prag-unrelated", passages=[magazine, person], lora_passages=[person, magazine]
    )
    expected = lora.merge(stored[::-1], [0.5 * 3 / 5, 0.0])
    torch.testing.assert_close(lora.delta(prepared.adapter, "up_proj", 1, 2.0), lora.delta(expected, "up_proj", 1, 2.0))
    pipeline.config.answer.merge = "sum"  # the reference's sum: every document at full weight
    prepared = pipeline.prepare(question, "prag", passages=[magazine, person])
    torch.testing.assert_close(
        lora.delta(prepared.adapter, "down_proj", 0, 2.0),
        lora.delta(lora.merge(stored, [0.5, 0.5]), "down_proj", 0, 2.0),
    )


def test_matched_merge_names_what_it_cannot_weigh(tiny_llm, tmp_path):
    config = Config()
    config.answer.merge = "matched"
    pipeline = Pipeline(tmp_path / "home", config, llm=tiny_llm)
    doc = Passage("d", "Ada Lovelace", "Ada Lovelace was an English mathematician.")
    pipeline.adapters.put("d", init_adapter(pipeline.lora_model.shapes(config.lora.rank), 1))
    with pytest.raises(
        ValueError, match="answer.merge=matched: document 'd' has a stored LoRA but no stored augmentation"
    ):
        pipeline.prepare("Who was Ada Lovelace?", "prag", passages=[doc])
    with pytest.raises(ValueError, match="answer.merge: 'matched' weighs trained LoRAs.*'dyprag'"):
        pipeline.prepare("Who was Ada Lovelace?", "dyprag", passages=[doc])


def test_answering_on_the_frozen_start_reads_it_without_the_documents_loras(tiny_llm, tmp_path):
    """`answer.prefix = "frozen"`: the prompt format's fixed start, as `train.prefix = "frozen"` trained the LoRAs
    on it, is read once without them and shared by every later batch; each row answers as it does alone, in
    any mix of modes; the stored adapters are the same (it is a question-time setting)."""
    magazine = Passage("m", "Arthur's Magazine", "Arthur's Magazine (1844-1846) was an American literary periodical.")
    person = Passage("p", "John Smith", "John Smith was born in Ohio.")
    configs = {}
    for prefix in ("lora", "frozen"):
        configs[prefix] = Config()
        configs[prefix].answer.prefix = prefix
        configs[prefix].answer.max_new_tokens = 6
    every = Pipeline(tmp_path / "home", configs["lora"], llm=tiny_llm)
    frozen = Pipeline(tmp_path / "home", configs["frozen"], llm=tiny_llm)
    assert frozen.adapters.root == every.adapters.root
    shapes = every.lora_model.shapes(configs["lora"].lora.rank)
    for seed, p in enumerate((magazine, person)):
        every.adapters.put(p.id, {k: v + 0.3 * (seed + 1) for k, v in init_adapter(shapes, seed).items()})
    questions = [("When was Arthur's Magazine started?", "prag"), ("Where was John Smith born?", "combine")]
    prepared = [frozen.prepare(q, mode, passages=[magazine, person]) for q, mode in questions]
    prepared.append(frozen.prepare("Who?", "closed", passages=[]))

    reads = []  # (tokens read, LoRA in) for each forward of the first FFN projection
    layer = frozen.lora_model.layers["down_proj"][0]
    hook = layer.register_forward_hook(lambda m, args, out: reads.append((args[0].shape[1], m.A is not None)))
    try:
        start = frozen.frozen_prefix()
        assert start is frozen.frozen_prefix()  # computed once...
        length = min(prompt_start(tiny_llm, frozen.format, True), prompt_start(tiny_llm, frozen.format, False))
        assert start.ids == prepared[0].prompt[:length] == prepared[1].prompt[:length]
        assert reads == [(length, False)]  # ...without the LoRAs
        reads.clear()
        batched = [a.text for a in frozen.generate(prepared)]
        alone = [frozen.generate([p])[0].text for p in prepared]
        assert batched == alone
        assert not any(n == length for n, _ in reads)  # the start was computed before, not again
        reads.clear()
        every.generate(prepared[:1])
        assert reads[0] == (len(prepared[0].prompt), True)  # the LoRA reads every token of the prompt
    finally:
        hook.remove()
