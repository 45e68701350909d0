"""Batched multi-document training learns exactly what training each document alone learns."""

from __future__ import annotations

import shutil

import pytest
import torch

from prag.config import LoRAConfig, TrainConfig
from prag.lora import LoRAModel, init_adapter
from prag.parameterize import IGNORE, Sequence, train_adapters, training_sequences


def make_sequences(n, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for length in lengths[:n]:
        ids = torch.randint(0, 2000, (length,), generator=g).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2 :]
        sequences.append(Sequence(ids, labels))
    return sequences


def test_batched_training_equals_one_by_one(tiny_llm):
    lora_model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    lora_config = LoRAConfig()
    train = TrainConfig(lr=1e-3, epochs=2, docs_per_batch=8)
    # different numbers and lengths of sequences: padding, idle steps and the length grouping must not
    # leak between documents
    documents = [
        make_sequences(3, [20, 7, 13], seed=1),
        make_sequences(1, [9], seed=2),
        make_sequences(2, [18, 30], seed=3),  # 18 trains padded beside 20; 30 alone
    ]
    batched = train_adapters(tiny_llm, lora_model, documents, lora_config, train, show_progress=False)
    alone = [
        train_adapters(tiny_llm, lora_model, [doc], lora_config, train, show_progress=False)[0] for doc in documents
    ]
    initial = init_adapter(lora_model.shapes(lora_config.rank), lora_config.init_seed)
    for b, a in zip(batched, alone, strict=True):
        for key in b:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
        assert not torch.equal(b["down_proj.B"], initial["down_proj.B"])  # training moved it


def test_a_token_budget_per_step_keeps_training_exact(tiny_llm):
    """With room for only a few sequences per step, documents wait their turn and learn the same."""
    lora_model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    documents = [make_sequences(2, [20, 19], seed=s) for s in range(5)]
    free = train_adapters(tiny_llm, lora_model, documents, LoRAConfig(), TrainConfig(lr=1e-3), show_progress=False)
    tight = TrainConfig(lr=1e-3, max_tokens_per_step=45)  # two sequences of ~20 tokens a step
    budget = train_adapters(tiny_llm, lora_model, documents, LoRAConfig(), tight, show_progress=False)
    for a, b in zip(free, budget, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_training_sequences_fit_the_length_cap_and_never_lose_the_reply(tokenizer):
    """A passage too long for train.max_length is shortened in the prompt; the question, instruction and
    reply stay whole, and a sequence with nothing to learn is dropped (no zero-loss step)."""
    from types import SimpleNamespace

    from prag.augment import Augmentation
    from prag.corpus import Passage
    from prag.llm import LLM
    from prag.prompt import AnswerFormat

    llm = LLM(SimpleNamespace(), tokenizer, "tokenizer only")  # training_sequences only tokenizes
    passage = Passage("d", "Long", "word " * 3000)
    aug = Augmentation("d", rewrites=["short rewrite"], qa=[{"question": "What is it?", "answer": "a word"}])
    fmt = AnswerFormat()
    reply = tokenizer.encode(fmt.reply("a word"), add_special_tokens=False)
    train = TrainConfig(max_length=300)
    seqs = training_sequences(llm, passage, aug, train, fmt)
    assert len(seqs) == 2  # with the (shortened) passage and with the rewrite
    for seq in seqs:
        assert len(seq.input_ids) <= 300
        assert seq.input_ids[-len(reply) :] == reply and seq.labels[-len(reply) :] == reply
    assert "What is it?" in tokenizer.decode(seqs[0].input_ids)
    # a cap below even the passage-free prompt: nothing trainable is left, and nothing is returned
    assert training_sequences(llm, passage, aug, TrainConfig(max_length=20), fmt) == []


def test_batched_adamw_matches_torch_adamw():
    from prag.parameterize import BatchedAdamW

    torch.manual_seed(0)
    ours = torch.randn(3, 2, 4)  # (layers, documents, features)
    theirs = [ours[:, d].clone().requires_grad_(True) for d in range(2)]
    ours.requires_grad_(True)
    opt = BatchedAdamW([ours], lr=0.01, weight_decay=0.01)
    torch_opts = [torch.optim.AdamW([p], lr=0.01, weight_decay=0.01) for p in theirs]
    for step in range(4):
        grad = torch.randn(3, 2, 4)
        active = torch.tensor([True, step % 2 == 0])  # document 1 sits out odd steps
        ours.grad = grad.clone()
        opt.step(active)
        for d in range(2):
            if active[d]:
                theirs[d].grad = grad[:, d].clone()
                torch_opts[d].step()
    for d in range(2):
        torch.testing.assert_close(ours[:, d].detach(), theirs[d].detach())


def distill_sequences(n, seed):
    """Student: random prompt + reply; teacher: a longer random prompt (the 'passage') + the same reply."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, context, reply = (torch.randint(0, 2000, (k,), generator=g).tolist() for k in (6, 12, 3))
        teacher = Sequence(context + prompt + reply, [IGNORE] * len(context + prompt) + reply)
        out.append(Sequence(prompt + reply, [IGNORE] * len(prompt) + reply, teacher))
    return out


def test_distillation_loss_is_kl_to_the_teacher(tiny_llm):
    from prag.parameterize import _teacher_log_probs, sequence_losses

    seqs = distill_sequences(2, seed=4)
    teacher = _teacher_log_probs(tiny_llm, seqs)
    assert [t.shape[0] for t in teacher.values()] == [3, 3]  # one distribution per reply token
    losses = sequence_losses(tiny_llm, seqs, teacher)
    # by hand for the first sequence: mean over reply tokens of KL(teacher || student)
    s = seqs[0]
    with torch.no_grad():
        student = torch.log_softmax(tiny_llm.model(torch.tensor([s.input_ids])).logits[0, -4:-1].float(), -1)
        t = torch.log_softmax(tiny_llm.model(torch.tensor([s.teacher.input_ids])).logits[0, -4:-1].float(), -1)
    expected = (t.exp() * (t - student)).sum(-1).mean()
    torch.testing.assert_close(losses[0], expected, rtol=1e-4, atol=1e-5)
    # a student that reads exactly what the teacher reads has nothing to learn
    same = Sequence(s.teacher.input_ids, s.teacher.labels, s.teacher)
    assert sequence_losses(tiny_llm, [same], _teacher_log_probs(tiny_llm, [same]))[0].abs() < 1e-5


def test_distillation_training_moves_the_student_toward_the_teacher(tiny_llm):
    from prag.parameterize import _teacher_log_probs, sequence_losses

    lora_model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    lora_config, train = LoRAConfig(), TrainConfig(lr=3e-3, epochs=10, objective="distill")
    docs = [distill_sequences(2, seed=5), distill_sequences(3, seed=6)]
    teacher = _teacher_log_probs(tiny_llm, [s for d in docs for s in d])
    before = [sequence_losses(tiny_llm, d, teacher).mean().item() for d in docs]
    adapters = train_adapters(tiny_llm, lora_model, docs, lora_config, train, show_progress=False)
    for doc, adapter, loss_before in zip(docs, adapters, before, strict=True):
        lora_model.inject(adapter, lora_config.scale)
        with torch.no_grad():
            after = sequence_losses(tiny_llm, doc, teacher).mean().item()
        lora_model.clear()
        assert after < 0.7 * loss_before
    # and batched distillation equals distilling each document alone
    alone = train_adapters(tiny_llm, lora_model, docs[1:], lora_config, train, show_progress=False)[0]
    for key in alone:
        torch.testing.assert_close(adapters[1][key], alone[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_equals_eager_and_leaves_the_model_eager(tiny_llm):
    from torch._dynamo.utils import counters

    from prag.lora import find_decoder_layers
    from prag.parameterize import compiled_decoder

    lora_model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    lora_config, train = LoRAConfig(), TrainConfig(lr=1e-3, epochs=2, docs_per_batch=8)
    documents = [make_sequences(3, [20, 7, 13], seed=1), make_sequences(2, [18, 30], seed=3)]
    eager = train_adapters(tiny_llm, lora_model, documents, lora_config, train, show_progress=False)
    layers = list(find_decoder_layers(tiny_llm.model))
    counters.clear()
    with compiled_decoder(tiny_llm.model):
        assert all(
            type(layer) is not type(original)
            for layer, original in zip(find_decoder_layers(tiny_llm.model), layers, strict=True)
        )
        compiled = train_adapters(tiny_llm, lora_model, documents, lora_config, train, show_progress=False)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile (no silent fallback to eager)
    assert list(find_decoder_layers(tiny_llm.model)) == layers  # the very same eager modules are back
    for c, e in zip(compiled, eager, strict=True):
        for key in c:
            torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-4)


def test_compile_decision():
    from prag.parameterize import COMPILE_MIN_DOCS, should_compile

    cpu = torch.device("cpu")
    assert should_compile(TrainConfig(compile="on"), 1, cpu)
    assert not should_compile(TrainConfig(compile="off"), 10 * COMPILE_MIN_DOCS, cpu)
    assert not should_compile(TrainConfig(), COMPILE_MIN_DOCS - 1, cpu)  # not worth its compile time
    assert not should_compile(TrainConfig(prefix="frozen"), 10 * COMPILE_MIN_DOCS, cpu)  # recompiles per layer


def with_prefix(
    prefix: list[int], documents: list[list[int]], labelled_from: int, own_start: int = 0
) -> list[list[Sequence]]:
    """Documents whose sequences are `prefix` (the format's fixed start) + their own tokens (each starting with
    a token of its own; after `own_start` tokens that all the sequences of one document share, if any)."""
    out = []
    for d, doc in enumerate(documents):
        out.append([])
        shared = [3500 + d] * own_start
        for first, rest in enumerate(doc):
            ids = prefix + shared + [3000 + first] + rest
            out[-1].append(Sequence(ids, [IGNORE] * labelled_from + ids[labelled_from:], fixed=len(prefix)))
    return out


def test_a_frozen_prefix_is_computed_once_and_changes_nothing_without_a_lora(tiny_llm):
    from prag.parameterize import FrozenPrefix, label_logits

    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 2000, (20,), generator=g).tolist()
    rests = [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (6, 11, 8)]
    [sequences] = with_prefix(prefix, [rests], labelled_from=24)
    frozen = FrozenPrefix.compute(tiny_llm, sequences)
    assert frozen.length == 20 and frozen.cache.get_seq_length() == 20
    # the rest of each sequence on top of the prefix's keys and values: the same logits as the whole sequence
    for whole, rest in zip(label_logits(tiny_llm, sequences), label_logits(tiny_llm, sequences, frozen), strict=True):
        torch.testing.assert_close(whole, rest, rtol=1e-4, atol=1e-5)
    # the prefix stops before the token that predicts the first label, whatever the sequences share
    [early] = with_prefix(prefix, [rests], labelled_from=18)
    assert FrozenPrefix.compute(tiny_llm, early).length == 17
    [short] = with_prefix(prefix[:10], [rests], labelled_from=12)
    assert FrozenPrefix.compute(tiny_llm, short) is None  # under MIN_SHARED_PREFIX: not worth a cache
    # never past the format's fixed start, however much more the sequences share
    [longer] = with_prefix(prefix, [rests], labelled_from=30, own_start=5)
    assert FrozenPrefix.compute(tiny_llm, longer).length == 20
    assert FrozenPrefix.compute(tiny_llm, [Sequence(s.input_ids, s.labels) for s in longer]) is None  # no fixed start


def test_training_on_a_frozen_prefix_is_exact_per_document_and_learns(tiny_llm):
    """Batched training with a frozen prefix learns what each document learns alone with it, and differs from
    training the LoRA on every token."""
    lora_model = LoRAModel(tiny_llm.model, ("gate_proj", "up_proj", "down_proj"))
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 2000, (24,), generator=g).tolist()
    docs = [[torch.randint(0, 2000, (n,), generator=g).tolist() for n in lengths] for lengths in ([6, 9], [7, 5, 8])]
    # each document's own sequences share more than the prefix: alone, a group-wide shared prefix would be
    # longer than in the batch, and the document would learn something else
    documents = with_prefix(prefix, docs, labelled_from=30, own_start=3)
    frozen = TrainConfig(lr=1e-3, epochs=2, prefix="frozen")
    batched = train_adapters(tiny_llm, lora_model, documents, LoRAConfig(), frozen, show_progress=False)
    alone = [train_adapters(tiny_llm, lora_model, [d], LoRAConfig(), frozen, show_progress=False)[0] for d in documents]
    everywhere = train_adapters(
        tiny_llm, lora_model, documents, LoRAConfig(), TrainConfig(lr=1e-3, epochs=2, prefix="lora"), None, False
    )
    initial = init_adapter(lora_model.shapes(LoRAConfig().rank), LoRAConfig().init_seed)
    for b, a, e in zip(batched, alone, everywhere, strict=True):
        for key in b:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
        assert not torch.equal(b["down_proj.B"], initial["down_proj.B"])  # it trained
        assert not torch.allclose(b["down_proj.B"], e["down_proj.B"], rtol=1e-3, atol=1e-6)  # on fewer tokens


def test_training_sequences_mark_the_formats_fixed_start(tiny_llm):
    """Every QA sequence starts with the format's own tokens (chat header, instruction, worked turns, and what
    comes before the question when no passage is read), and `fixed` counts exactly those, the same for every
    sequence under one config: not the "What" that one document's questions share, nor a word of a passage."""
    from prag.augment import Augmentation
    from prag.corpus import Passage
    from prag.llm import shared_prefix
    from prag.parameterize import prompt_start
    from prag.prompt import SHORT_INSTRUCTION, AnswerFormat

    passage = Passage("d1", "Ada Lovelace", "Ada Lovelace was an English mathematician who died in London in 1852.")
    aug = Augmentation("d1", qa=[{"question": f"What {w} Ada Lovelace?", "answer": "London"} for w in ("of", "is")])
    decode = tiny_llm.tokenizer.decode
    for fmt in (AnswerFormat(), AnswerFormat(instruction="examples")):
        alone_start, any_start = prompt_start(tiny_llm, fmt, False), prompt_start(tiny_llm, fmt, True)
        assert decode(fmt.chat_ids(tiny_llm, "Q", [])[:alone_start]).endswith("Question:")
        assert SHORT_INSTRUCTION in decode(fmt.chat_ids(tiny_llm, "Q", [])[:any_start]) and any_start < alone_start
        alone = training_sequences(tiny_llm, passage, aug, TrainConfig(qa_context="none"), fmt)
        both = training_sequences(tiny_llm, passage, aug, TrainConfig(qa_context="both"), fmt)
        assert len(alone) == 2 and {s.fixed for s in alone} == {alone_start}
        assert len(both) == 3 and {s.fixed for s in both} == {any_start}  # a passage is read in one of them
        for s in alone + both:
            assert s.input_ids[: s.fixed] == fmt.chat_ids(tiny_llm, "Z", [])[: s.fixed]
        assert len(shared_prefix([s.input_ids for s in alone])) > alone_start  # "What" is not the format's
