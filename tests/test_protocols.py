"""Dataset protocols: picked by the dataset's name, applied under the user's settings, recorded in a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prag.cli import build_parser, load_config
from prag.config import Config
from prag.protocols import PROTOCOLS, dataset_name, protocol_settings

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


@pytest.mark.parametrize(
    "path, name",
    [
        ("../shared/data/qa/hotpotqa/dev.jsonl", "hotpotqa"),
        ("data/2wikimultihopqa/dev.jsonl", "2wikimultihopqa"),
        ("popqa.jsonl", "popqa"),
        ("/x/complexwebquestions/test.jsonl", "complexwebquestions"),
        ("my_questions.jsonl", "my_questions"),  # no protocol: the defaults
    ],
)
def test_protocol_is_picked_from_the_dataset_name(path, name):
    assert dataset_name(path) == name


def test_reference_profile_is_the_reference_implementations_settings():
    hotpot = protocol_settings("hotpotqa", "reference")
    assert hotpot["answer.style"] == "cot" and hotpot["answer.fewshot"] == "hotpotqa"
    assert hotpot["answer.max_new_tokens"] == 128 and hotpot["augment.full_answers"] is True
    popqa = protocol_settings("popqa", "reference")
    assert popqa["train.epochs"] == 2 and popqa["answer.max_new_tokens"] == 20
    for settings in (hotpot, popqa, protocol_settings("unknown", "reference")):
        assert settings["answer.instruction"] == "reference" and settings["train.loss_on"] == "all"
        assert settings["train.prefix"] == "lora"  # the reference trains the LoRA on every token
        assert settings["augment.rewrites"] == 1  # and on one rewrite of each passage (our default: none)
    assert protocol_settings("unknown") == {} and protocol_settings("none", "reference") == {}
    for name in ("hotpotqa", "2wikimultihopqa"):  # ours: chain-of-thought too (it won on the tune slice)
        ours = protocol_settings(name)
        assert (ours["answer.style"], ours["answer.max_new_tokens"], ours["augment.full_answers"]) == ("cot", 128, True)
        assert ours["answer.fewshot"] == name and "answer.instruction" not in ours
    assert (
        protocol_settings("popqa")["answer.style"]
        == protocol_settings("complexwebquestions")["answer.style"]
        == "direct"
    )
    with pytest.raises(ValueError, match="unknown protocol profile"):
        protocol_settings("popqa", "paper")
    for profile in PROTOCOLS.values():  # every protocol is a valid config
        for settings in profile.values():
            config = Config()
            for key, value in settings.items():
                config.set(key, value)


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_config_precedence_defaults_protocol_workspace_file_and_set(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    dataset = "../shared/data/qa/hotpotqa/dev.jsonl"
    args = _args("eval", "--home", str(home), "--dataset", dataset, "--out", "x", "--profile", "reference")
    config = load_config(args)
    assert config.answer.style == "cot" and config.train.loss_on == "all"  # the protocol over the defaults
    # the workspace records only what differs from the defaults, and beats the protocol
    (home / "config.json").write_text(json.dumps({"overrides": {"answer.style": "direct", "lora.rank": 4}}))
    args = _args("eval", "--home", str(home), "--dataset", dataset, "--out", "x", "--profile", "reference")
    config = load_config(args)
    assert (config.answer.style, config.lora.rank, config.train.loss_on) == ("direct", 4, "all")
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"lora": {"rank": 8}}))
    args = _args("ask", "q", "--home", str(home), "--config", str(file), "--set", "lora.rank=16")
    assert load_config(args).lora.rank == 16  # --set last
    assert load_config(_args("ask", "q", "--home", str(home), "--config", str(file))).lora.rank == 8
    # no dataset, no protocol
    assert load_config(_args("ask", "q", "--home", str(home))).train.loss_on == Config().train.loss_on


def test_a_workspace_follows_later_default_changes(tmp_path):
    """Indexing records the overrides only: every other field comes from the code's current defaults."""
    from prag.pipeline import Pipeline

    config = Config()
    config.set("lora.rank", 4)
    Pipeline(tmp_path / "home", config).index(DEMO / "corpus.jsonl", show_progress=False)
    recorded = json.loads((tmp_path / "home" / "config.json").read_text())
    assert recorded == {"overrides": {"lora.rank": 4}}
    loaded = load_config(_args("ask", "q", "--home", str(tmp_path / "home")))
    expected = Config()
    expected.lora.rank = 4
    assert loaded == expected


def test_a_legacy_full_config_is_ignored_with_a_note(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    old = Config()
    old.train.loss_on = "all"  # the default of an older version
    (home / "config.json").write_text(json.dumps(old.to_dict()))
    assert load_config(_args("ask", "q", "--home", str(home))).train.loss_on == "answer"
    assert "older version" in capsys.readouterr().err


def test_popqa_documents_are_parameterized_with_the_spans_recipe_by_default():
    """Chosen on PopQA's tune slice; the multi-hop sets keep the default recipe, the reference profile the paper's."""
    config = load_config(_args("eval", "--dataset", "../shared/data/qa/popqa/dev.jsonl", "--out", "x"))
    assert config.augment.qa_style == "answer_first" and config.train.qa_context == "none"
    assert (config.augment.rewrites, config.train.epochs, config.train.lr) == (0, 3, 1e-3)
    assert config.augment.attempts == 3  # a retried span costs one short question
    for name, profile in (("hotpotqa", "default"), ("popqa", "reference")):
        config = load_config(_args("eval", "--dataset", f"x/{name}/dev.jsonl", "--out", "x", "--profile", profile))
        assert config.augment.qa_style == "free" and config.train.qa_context == "reference"
        assert config.augment.attempts == 1  # free-form QA: one generation round (docs/performance.md)
        assert config.augment.rewrites == (1 if profile == "reference" else 0)  # no rewrite by default
