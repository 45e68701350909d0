"""Other models than the default: a GGUF file by path, a Hugging Face directory, and the Qwen2 architecture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from prag import MODES, Config, Pipeline, lora
from prag.config import DEFAULT_MODEL, LoRAConfig, ModelConfig, TrainConfig
from prag.llm import LLM, bundled_gguf, resolve_model_dir
from prag.parameterize import IGNORE, Sequence, train_adapters
from prag.pipeline import GENERATED_LORAS

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
FFN = ("gate_proj", "up_proj", "down_proj")


def test_a_gguf_file_by_path_answers_in_every_mode(default_llm, tmp_path):
    """The default model's own GGUF, named by its path: dequantized into the same cache, and every mode runs."""
    gguf = bundled_gguf()
    assert resolve_model_dir(str(gguf)) == resolve_model_dir(DEFAULT_MODEL)  # one cache entry per file
    copy = tmp_path / "elsewhere" / gguf.name  # the same file in another virtual environment: no second copy
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    assert resolve_model_dir(str(copy)) == resolve_model_dir(DEFAULT_MODEL)
    llm = LLM.load(ModelConfig(name=str(gguf), dtype="float32"))  # as `default_llm`: the same weights, bit for bit
    torch.testing.assert_close(llm.model.lm_head.weight, default_llm.model.lm_head.weight, rtol=0, atol=0)
    assert llm.eos_ids == default_llm.eos_ids

    config = Config.from_dict(
        {
            "model": {"name": str(gguf)},
            # one document, augmented in one round: what is tested is the model named by path, not augmentation
            "augment": {"attempts": 1, "qa_pairs": 2, "rewrite_max_tokens": 96},
            "answer": {"top_k": 1},
        }
    )
    pipeline = Pipeline(tmp_path / "home", config, llm=llm)
    pipeline.index(DEMO / "corpus.jsonl", show_progress=False)
    # every mode but the dyprag ones, which need a trained translator (tests/test_translator.py)
    modes = [mode for mode in MODES if mode not in GENERATED_LORAS]
    answers = {mode: pipeline.answer("What is George Rankin's occupation?", mode) for mode in modes}
    for mode, answer in answers.items():
        assert answer.text and answer.short_answer, mode
    assert [p.title for p in answers["prag"].passages] == ["George Rankin"]
    assert pipeline.adapters.has(answers["prag"].passages[0].id)


def test_model_names_that_are_neither_say_so(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(FileNotFoundError, match=f"no such file or directory {missing}"):
        resolve_model_dir(str(missing))
    with pytest.raises(FileNotFoundError, match=f"the directory {tmp_path} has no config.json"):
        resolve_model_dir(str(tmp_path))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match=f"{not_gguf} is not a GGUF file"):
        resolve_model_dir(str(not_gguf))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM.load(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct"))


def test_a_hugging_face_directory_with_its_own_stop_tokens(tiny_qwen2, tmp_path):
    """A local HF directory loads as it is; every end-of-sequence token of its generation config and its
    padding token end a reply, the chat template is the tokenizer's."""
    tokenizer = tiny_qwen2.tokenizer
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_text != tokenizer.eos_token_id
    tiny_qwen2.model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, 7])
    tiny_qwen2.model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # a padding token of its own, as Qwen2.5 has (<|endoftext|>)
    (tmp_path / "model" / "special_tokens_map.json").unlink(missing_ok=True)
    loaded_tokenizer = type(tokenizer).from_pretrained(tmp_path / "model", pad_token="<|endoftext|>")
    loaded_tokenizer.save_pretrained(tmp_path / "model")

    llm = LLM.load(ModelConfig(name=str(tmp_path / "model"), dtype="float32"))
    assert type(llm.model).__name__ == "Qwen2ForCausalLM"
    assert llm.eos_ids == sorted({tokenizer.eos_token_id, 7, end_of_text})
    assert llm.pad_id == end_of_text
    text = llm.tokenizer.decode(llm.chat("Who wrote Hamlet?"))
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote Hamlet?"}], tokenize=False, add_generation_prompt=True
    )
    [reply] = llm.generate([llm.chat("Who wrote Hamlet?")], max_new_tokens=4)
    assert isinstance(reply, str)


def random_documents(lengths_per_doc, seed):
    g = torch.Generator().manual_seed(seed)
    documents = []
    for lengths in lengths_per_doc:
        sequences = []
        for length in lengths:
            ids = torch.randint(0, 2000, (length,), generator=g).tolist()
            sequences.append(Sequence(ids, [IGNORE] * (length // 2) + ids[length // 2 :]))
        documents.append(sequences)
    return documents


def test_qwen2_trains_merges_and_injects(tiny_qwen2):
    """Attention biases, a separate output matrix and other sizes change nothing in the LoRA path."""
    model = tiny_qwen2.model
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    lora_model = lora.LoRAModel(model, FFN)
    lora_config, train = LoRAConfig(), TrainConfig(lr=1e-3, epochs=2)
    documents = random_documents([[15, 6, 11], [8], [14, 25]], seed=3)

    batched = train_adapters(tiny_qwen2, lora_model, documents, lora_config, train, show_progress=False)
    for document, adapter in zip(documents, batched, strict=True):
        [alone] = train_adapters(tiny_qwen2, lora_model, [document], lora_config, train, show_progress=False)
        for key in adapter:
            torch.testing.assert_close(adapter[key], alone[key], rtol=1e-4, atol=1e-5)
        assert adapter["down_proj.B"].abs().sum() > 0  # trained away from the zero initialization

    merged = lora.merge(batched)
    for name in FFN:
        for layer in range(lora_model.num_layers):
            summed = sum(lora.delta(a, name, layer, lora_config.scale) for a in batched)
            torch.testing.assert_close(lora.delta(merged, name, layer, lora_config.scale), summed)

    ids = torch.tensor([documents[0][0].input_ids])
    with torch.no_grad():
        base = model(ids).logits
        lora_model.inject(merged, lora_config.scale)
        injected = model(ids).logits
        # the injected model is the model with the summed deltas added to its FFN weights
        for name in FFN:
            for layer_index, layer in enumerate(lora_model.layers[name]):
                layer.base.weight += lora.delta(merged, name, layer_index, lora_config.scale)
        lora_model.clear()
        edited = model(ids).logits
    assert not torch.allclose(base, injected, atol=1e-3)
    torch.testing.assert_close(injected, edited, rtol=1e-4, atol=1e-4)


def test_a_missing_target_module_names_the_model_and_its_projections(tiny_qwen2):
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM's mlp \(Qwen2MLP\) has no linear 'fc1'.*'gate_proj'"):
        lora.LoRAModel(tiny_qwen2.model, ("fc1",))
