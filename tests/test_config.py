import json

import pytest

from prag.config import Config
from prag.pipeline import Pipeline


def test_round_trip_through_a_file_with_command_line_overrides(tmp_path):
    config = Config()
    config.set("train.lr", "1e-3")
    config.set("lora.target_modules", "up_proj,down_proj")
    config.set("answer.init_in_all_modes", "yes")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    loaded = Config.load(path)
    assert loaded == config
    assert (loaded.train.lr, loaded.lora.target_modules, loaded.answer.init_in_all_modes) == (
        1e-3,
        ("up_proj", "down_proj"),
        True,
    )


def test_keys_ignore_fields_that_do_not_change_what_is_stored():
    a, b = Config(), Config()
    b.set("train.docs_per_batch", "4")
    b.set("answer.merge", "mean")
    assert a.key("train", "answer") == b.key("train", "answer")
    b.set("train.lr", "1e-3")
    assert a.key("train", "answer") != b.key("train", "answer")


def test_a_field_added_later_keys_only_when_changed():
    """`train.qa_context`, `train.locality*` and `train.prefix` at the values that built the stores made before
    they existed keep those stores' key; `train.prefix`, whose default changed since, keys its new default."""
    import hashlib

    from prag.config import NOT_KEYED

    values = {k: v for k, v in Config().to_dict()["train"].items() if f"train.{k}" not in NOT_KEYED}
    del values["qa_context"], values["locality"], values["locality_context"], values["prefix"]
    before = hashlib.sha256(json.dumps({"train": values}, sort_keys=True).encode()).hexdigest()[:12]
    config = Config()
    config.set("train.prefix", "lora")  # how every adapter stored before `train.prefix` existed was trained
    assert config.key("train") == before
    config.set("train.qa_context", "none")
    assert config.key("train") != before
    config = Config()
    config.set("train.prefix", "lora")
    config.set("train.locality", 4)
    assert config.key("train") != before
    # the default trains on a frozen prefix: it must never find an adapter trained on every token
    assert Config().train.prefix == "frozen" and Config().key("train") != before


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("train.loss_on", "al", "bad value 'al' for train.loss_on: choose from answer, all"),
        ("answer.merge", "avg", "bad value 'avg' for answer.merge: choose from sum, mean, matched"),
        ("augment.qa_style", "answer-first", "augment.qa_style: choose from free, answer_first"),
        ("answer.init_in_all_modes", "ture", "bad value 'ture' for answer.init_in_all_modes (bool)"),
        ("train.epochs", "two", "bad value 'two' for train.epochs (int)"),
        ("train.speed", "1", "unknown config field 'train.speed'"),
    ],
)
def test_a_bad_value_names_the_field_and_leaves_the_config_unchanged(dotted, value, message):
    config = Config()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.set(dotted, value)
    assert config == Config()


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("train.epochs", "0", "bad value 0 for train.epochs: a whole number, at least 1"),
        ("augment.rewrites", "-1", "bad value -1 for augment.rewrites: a whole number, at least 0"),
        ("lora.rank", "0", "bad value 0 for lora.rank"),
        ("train.lr", "0", "bad value 0.0 for train.lr: must be above 0"),
    ],
)
def test_a_count_below_its_least_value_is_refused_when_the_config_is_checked(dotted, value, message):
    config = Config()
    config.set(dotted, value)
    with pytest.raises(ValueError, match=message):
        config.validate()
    fine = Config()
    fine.set("augment.rewrites", "0")  # no rewrite is a recipe (with train.qa_context=none nothing reads it)
    assert fine.validate() is fine


def test_bad_value_in_a_config_file_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": {"objective": "distil"}}))
    with pytest.raises(ValueError, match="train.objective: choose from lm, distill"):
        Config.load(path)


def test_a_config_built_in_code_is_checked_by_the_pipeline(tmp_path):
    config = Config()
    config.train.objective = "distil"
    with pytest.raises(ValueError, match="bad value 'distil' for train.objective"):
        Pipeline(tmp_path / "home", config)
    assert not (tmp_path / "home").exists()


def test_a_new_sampler_keys_new_augmentations_and_adapters(tmp_path, monkeypatch):
    import prag.pipeline

    before = Pipeline(tmp_path)
    monkeypatch.setattr(prag.pipeline, "SAMPLER_VERSION", prag.pipeline.SAMPLER_VERSION + 1)
    after = Pipeline(tmp_path)
    assert str(before.augmentations.root) != str(after.augmentations.root)
    assert str(before.adapters.root) != str(after.adapters.root)


def test_a_new_answer_first_version_keys_only_answer_first_stores(tmp_path, monkeypatch):
    import prag.pipeline

    answer_first = Config()
    answer_first.augment.qa_style = "answer_first"
    before = [Pipeline(tmp_path), Pipeline(tmp_path, answer_first)]
    monkeypatch.setattr(prag.pipeline, "ANSWER_FIRST_VERSION", prag.pipeline.ANSWER_FIRST_VERSION + 1)
    after = [Pipeline(tmp_path), Pipeline(tmp_path, answer_first)]
    assert str(before[0].augmentations.root) == str(after[0].augmentations.root)  # free-form pairs: unchanged
    assert str(before[0].adapters.root) == str(after[0].adapters.root)
    assert str(before[1].augmentations.root) != str(after[1].augmentations.root)
    assert str(before[1].adapters.root) != str(after[1].adapters.root)
