"""Generation internals: the decoding loop, the top-k sampler and the shared prompt prefix computed once."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from prag import lora
from prag.augment import QA_PREFIX, QA_PROMPT, answer_first_example, answer_first_prompt, qa_example
from prag.corpus import Passage
from prag.llm import MIN_SHARED_PREFIX, TopKSampler, prefix_groups, shared_prefix


def test_top_k_sampler_draws_only_among_the_top_k():
    torch.manual_seed(0)
    scores = torch.randn(3, 1000)
    scores[2, :5] = 10.0  # row 2: five equal leaders, far ahead of the rest
    sampler = TopKSampler(k=5, temperature=1.0, seed=0)
    top = scores.topk(5, dim=-1).indices
    drawn = [set() for _ in range(3)]
    for _ in range(300):
        for row, token in enumerate(sampler(scores).tolist()):
            drawn[row].add(token)
    for row in range(3):
        assert drawn[row] <= set(top[row].tolist())
    assert drawn[2] == {0, 1, 2, 3, 4}  # and it does sample: every leader comes up


def test_sampling_is_seeded_and_top_1_is_greedy(tiny_llm):
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert tiny_llm.generate(prompts, 8, sample=True, top_k=1) == tiny_llm.generate(prompts, 8)
    first = tiny_llm.generate(prompts, 8, sample=True, temperature=5.0, seed=3)
    assert tiny_llm.generate(prompts, 8, sample=True, temperature=5.0, seed=3) == first
    assert tiny_llm.generate(prompts, 8, sample=True, temperature=5.0, seed=4) != first


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == [1, 2, 3]
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert shared_prefix([[1, 2], [3, 2]]) == []


def test_prefix_cache_gives_the_same_tokens_as_no_cache(default_llm):
    """Greedy decoding of QA prompts (worked example shared, passages of different lengths): the shared
    prefix computed once, laid out prefix | padding | rest, must change no token."""
    passages = [
        "Ada Lovelace\nAda Lovelace was an English mathematician. In 1843 she published notes on the "
        "Analytical Engine designed by Charles Babbage.",
        "Paris\nParis is the capital of France.",
        "Nile\nThe Nile is a river in Africa, about 6,650 km long, flowing north through Egypt into the "
        "Mediterranean Sea. Its two main tributaries are the White Nile and the Blue Nile.",
    ]
    llm = default_llm
    prompts = [llm.chat(QA_PROMPT.format(n=2, passage=p), QA_PREFIX, history=(qa_example(2),)) for p in passages]
    assert len(shared_prefix(prompts)) >= max(MIN_SHARED_PREFIX, 150)  # the worked example turn is shared
    cached = llm.generate(prompts, 24)
    assert cached == llm.generate(prompts, 24, share_prefix=False)
    assert cached == [llm.generate([p], 24)[0] for p in prompts]


def test_prefix_groups_are_runs_of_prompts_sharing_a_long_start():
    long_a, long_b = list(range(100, 100 + MIN_SHARED_PREFIX)), list(range(200, 200 + MIN_SHARED_PREFIX + 3))
    prompts = [long_a + [1], long_a + [2, 3], [7, 8], long_b + [4], long_b + [5], long_b + [6, 9], long_a + [1]]
    assert prefix_groups(prompts) == [(0, 2, MIN_SHARED_PREFIX), (3, 6, MIN_SHARED_PREFIX + 3)]
    short = list(range(MIN_SHARED_PREFIX - 1))
    assert prefix_groups([short + [1], short + [2]]) == []  # too short to be worth a pass of its own
    assert prefix_groups([long_a + [1], long_a + [1]]) == [(0, 2, MIN_SHARED_PREFIX)]  # each keeps a token


def test_grouped_prefixes_give_the_same_tokens_as_no_cache(default_llm):
    """Answer-first prompts (worked example shared by all; each passage shared by the prompts for its
    answers; one passage with a single answer): computed once per group, no greedy token may change."""
    llm = default_llm
    ada = Passage("1", "Ada Lovelace", "Ada Lovelace was an English mathematician. In 1843 she published notes.")
    nile = Passage("2", "Nile", "The Nile is a river in Africa, about 6,650 km long, flowing north through Egypt.")
    paris = Passage("3", "Paris", "Paris is the capital of France.")
    jobs = [(ada, "1843"), (ada, "English"), (nile, "Africa"), (nile, "Egypt"), (nile, "6,650"), (paris, "France")]
    prompts = [llm.chat(answer_first_prompt(a, p), QA_PREFIX, history=(answer_first_example(),)) for p, a in jobs]
    shared = len(shared_prefix(prompts))
    assert [(first, end) for first, end, _ in prefix_groups([p[shared:] for p in prompts])] == [(0, 2), (2, 5)]
    cached = llm.generate(prompts, 20)
    assert cached == llm.generate(prompts, 20, share_prefix=False)
    assert cached == [llm.generate([p], 20)[0] for p in prompts]


def test_groups_without_a_prefix_shared_by_all(tiny_llm):
    """Groups alone, no prefix common to every prompt: the same greedy tokens as no cache."""
    long_a, long_b = list(range(100, 100 + 2 * MIN_SHARED_PREFIX)), list(range(300, 300 + MIN_SHARED_PREFIX))
    prompts = [long_a + [1, 2], long_a + [3], [7, 8, 9], long_b + [4], long_b + [5, 6]]
    assert shared_prefix(prompts) == [] and len(prefix_groups(prompts)) == 2
    assert tiny_llm.generate(prompts, 12) == tiny_llm.generate(prompts, 12, share_prefix=False)
    assert tiny_llm.generate(prompts, 12) == [tiny_llm.generate([p], 12)[0] for p in prompts]


def test_decoding_loop_matches_hugging_face_greedy_generate(default_llm):
    """Rows that finish early leave the batch, and the chat header all prompts share is computed
    once; no token may change: the loop's greedy output equals transformers' `generate` on each
    prompt alone."""
    llm = default_llm
    questions = ["What is the capital of France? One word.", "Tell a long story about a dragon.", "Say hi."]
    prompts = [llm.chat(q) for q in questions]
    clock: dict = {}
    ours = llm.generate(prompts, 40, clock=clock)
    expected = []
    for prompt in prompts:
        out = llm.model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=llm.eos_ids
        )
        expected.append(out[0, len(prompt) :].tolist())
    assert ours == [llm.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    lengths = [len(e) for e in expected]
    assert min(lengths) < 40 == max(lengths)  # some rows finished (and left the batch) before others
    # each row's count, up to its end-of-sequence token included; the first token before the end
    assert clock["row_new_tokens"] == lengths and clock["new_tokens"] == 40
    assert 0 < clock["first_token"]


def test_stop_ends_a_row_and_the_others_go_on(tiny_llm):
    prompts = [[5, 17, 300, 42, 9], [7, 8], [1000, 2000, 3000, 11]]
    full = tiny_llm.generate(prompts, 10)
    stopped = tiny_llm.generate(prompts, 10, stop=lambda text: len(text) >= 3)
    for whole, short in zip(full, stopped, strict=True):
        assert whole.startswith(short)  # the same tokens, up to where the row stopped
        assert len(short) >= 3 or short == whole  # ...which is not before its text had 3 characters
    assert any(len(short) < len(whole) for whole, short in zip(full, stopped, strict=True))


def test_each_row_may_have_its_own_stop_test(tiny_llm):
    prompts = [[5, 17, 300, 42, 9], [7, 8], [1000, 2000, 3000, 11]]
    full = tiny_llm.generate(prompts, 10)
    stops = [lambda text: len(text) >= 2, lambda text: False, lambda text: len(text) >= 5]
    stopped = tiny_llm.generate(prompts, 10, stop=stops)
    assert stopped[1] == full[1]  # its test never holds: it runs to the budget
    for i, limit in ((0, 2), (2, 5)):
        assert full[i].startswith(stopped[i]) and (len(stopped[i]) >= limit or stopped[i] == full[i])
    with pytest.raises(ValueError, match="2 stop tests for 3 prompts"):
        tiny_llm.generate(prompts, 4, stop=stops[:2])


def test_rows_leave_the_batch_with_their_own_lora_deltas(tiny_llm):
    """Each row carries its own merged adapter (ranks 2 and 6, and none, zero-padded as the pipeline stacks
    them); rows that stop early leave the batch, and the remaining rows keep their own deltas: every row
    gets the tokens it gets alone with its adapter injected as is. The prompts share a long prefix, which
    must not be computed once here (each row's deltas give it other keys and values)."""
    model = tiny_llm.model
    lora_model = lora.LoRAModel(model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)

    def random_adapter(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}

    adapters = [random_adapter(1), lora.merge([random_adapter(s) for s in (2, 3, 4)]), None, random_adapter(5)]
    header = list(range(100, 100 + 2 * MIN_SHARED_PREFIX))  # shared by every prompt
    prompts = [header + [5, 17, 300], header + [7], header + [1000, 2000, 3000, 11], header + [42, 43]]
    stop = lambda text: len(text) >= 12  # noqa: E731  (rows reach it after different numbers of tokens)
    stacked = lora.stack_padded(adapters)
    scale = 2.0

    lora_model.inject(stacked, scale)
    injected = [(m.A, m.B) for m in lora_model.layers["up_proj"]]
    clock: dict = {}
    batched = tiny_llm.generate(prompts, 16, stop=stop, clock=clock)
    assert [(m.A, m.B) for m in lora_model.layers["up_proj"]] == injected  # the whole batch's deltas, restored
    lora_model.clear()
    lengths = clock["row_new_tokens"]
    assert min(lengths) < max(lengths)  # some rows stopped, and left the batch, before others

    alone, alone_lengths = [], []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        if adapter is not None:
            lora_model.inject(adapter, scale)
        row_clock: dict = {}
        alone += tiny_llm.generate([prompt], 16, stop=stop, clock=row_clock)
        alone_lengths += row_clock["row_new_tokens"]
        lora_model.clear()
    assert batched == alone
    assert lengths == alone_lengths
    assert clock["new_tokens"] == max(lengths) and 0 < clock["first_token"]
    without = tiny_llm.generate(prompts, 16, stop=stop)
    assert without != batched  # the deltas do act


def test_a_given_prefix_is_read_as_computed_and_each_rows_deltas_after_it(tiny_llm):
    """`answer.prefix = "frozen"`: the header's keys and values are computed once without the LoRAs, and each
    row reads them as they are, its own deltas acting from the header on: the greedy tokens of a hand-written
    loop that does just that, row by row."""
    model = tiny_llm.model
    lora_model = lora.LoRAModel(model, ("gate_proj", "up_proj", "down_proj"))
    shapes = lora_model.shapes(rank=2)
    adapters = [
        {k: torch.randn(s, generator=torch.Generator().manual_seed(seed)) * 0.3 for k, s in shapes.items()}
        for seed in (1, 2)
    ]
    header = list(range(100, 100 + 2 * MIN_SHARED_PREFIX))
    prompts = [header + [5, 17, 300], header + [7]]
    prefix = tiny_llm.prefill(header)  # nothing injected
    assert tiny_llm.generate(prompts, 8, prefix=prefix) == tiny_llm.generate(prompts, 8)  # the same keys and values

    lora_model.inject(lora.stack_padded(adapters), 2.0)
    frozen = tiny_llm.generate(prompts, 8, prefix=prefix)
    every = tiny_llm.generate(prompts, 8)  # the LoRAs on the header too
    lora_model.clear()

    def by_hand(prompt, adapter, lora_on_header):
        """Greedy tokens, and the first step's logits, with the header read with or without the row's LoRA."""
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            if lora_on_header:
                lora_model.inject(adapter, 2.0)
            model(input_ids=torch.tensor([header]), cache=cache, use_cache=True)
            lora_model.inject(adapter, 2.0)
            ids, tokens, first = prompt[len(header) :], [], None
            while len(tokens) < 8 and (not tokens or tokens[-1] not in tiny_llm.eos_ids):
                logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1]
                first = logits if first is None else first
                tokens.append(int(logits.argmax()))
                ids = tokens[-1:]
            lora_model.clear()
        return tiny_llm.tokenizer.decode(tokens, skip_special_tokens=True), first

    rows = list(zip(prompts, adapters, strict=True))
    assert frozen == [by_hand(prompt, adapter, False)[0] for prompt, adapter in rows]
    assert every == [by_hand(prompt, adapter, True)[0] for prompt, adapter in rows]
    # the header read without the LoRAs does change what the rows compute
    assert not torch.allclose(by_hand(*rows[0], False)[1], by_hand(*rows[0], True)[1], atol=1e-4)
    assert prefix.cache.get_seq_length() == len(header)  # not extended by the rows that read it
    with pytest.raises(ValueError, match=f"must start with the {len(header)} given tokens"):
        tiny_llm.generate([header[:-1] + [1, 2]], 4, prefix=prefix)


def test_deltas_for_another_batch_size_are_an_error(tiny_llm):
    lora_model = lora.LoRAModel(tiny_llm.model, ("up_proj",))
    shapes = lora_model.shapes(rank=2)
    lora_model.inject(lora.stack([lora.init_adapter(shapes, 0)] * 3), 1.0)
    with pytest.raises(ValueError, match="LoRA deltas for 3 examples, not one per row of a batch of 2"):
        tiny_llm.generate([[1, 2, 3], [4, 5]], 4)
