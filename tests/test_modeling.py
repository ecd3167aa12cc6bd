"""Model loading: per-group gradient norms per model family, the Hugging Face example's model flags, model names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bert_accum.core.modeling import load_tokenizer_and_model, model_id, parameter_group
from bert_accum.core.tasks import get_task
from bert_accum.errors import BertAccumError

TINY = dict(vocab_size=64, max_position_embeddings=64)


def _family(name: str, objective: str):
    """A tiny 2-layer model of one family, built in code (no download)."""
    import transformers as tf

    if name == "bert":
        config = tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **TINY)
        return (tf.BertForMaskedLM if objective == "mlm" else tf.BertForSequenceClassification)(config)
    if name == "distilbert":
        config = tf.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **TINY)
        return (tf.DistilBertForMaskedLM if objective == "mlm" else tf.DistilBertForSequenceClassification)(config)
    if name == "roberta":
        config = tf.RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  pad_token_id=1, **{**TINY, "max_position_embeddings": 66})
        return (tf.RobertaForMaskedLM if objective == "mlm" else tf.RobertaForSequenceClassification)(config)
    # ELECTRA with embedding_size != hidden_size has an `embeddings_project` layer; it counts as embeddings.
    config = tf.ElectraConfig(embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, **TINY)
    return (tf.ElectraForMaskedLM if objective == "mlm" else tf.ElectraForSequenceClassification)(config)


@pytest.mark.parametrize("objective", ["classification", "mlm"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra"])
def test_every_encoder_family_gets_embeddings_layers_and_head(family, objective):
    model = _family(family, objective)
    groups = {n: parameter_group(n) for n, _ in model.named_parameters()}
    assert set(groups.values()) == {"embeddings", "layer_0", "layer_1", "head"}, groups
    # the encoder layers hold most parameters, the head only the task's own (pooler, classifier, MLM head)
    assert all(g == "embeddings" for n, g in groups.items() if ".embeddings" in n)
    assert all(g.startswith("layer_") for n, g in groups.items() if ".layer." in n)


def test_an_unknown_family_falls_back_to_its_top_level_modules():
    import transformers as tf

    config = tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, pad_token_id=0)
    model = tf.GPT2ForSequenceClassification(config)
    assert {parameter_group(n) for n, _ in model.named_parameters()} == {"transformer", "score"}


def test_bert_names_keep_their_groups():
    """The groups recorded in steps.jsonl for BERT (and pinned in tests/data) do not change."""
    assert parameter_group("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert parameter_group("bert.encoder.layer.11.output.dense.weight") == "layer_11"
    assert parameter_group("bert.pooler.dense.weight") == "head"
    assert parameter_group("classifier.bias") == "head"
    assert parameter_group("cls.predictions.transform.dense.weight") == "head"
    assert parameter_group("embeddings.LayerNorm.weight") == "embeddings"  # a bare BertModel


def test_the_embedded_model_is_named_by_its_hub_id():
    assert model_id("embedded") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_id("/some/folder") == "/some/folder" and model_id("bert-base-uncased") == "bert-base-uncased"


def test_model_flags_reach_from_pretrained(monkeypatch, tiny_model_dir, tmp_path):
    """--config_name, --tokenizer_name, --model_revision, --trust_remote_code, --use_slow_tokenizer and
    --ignore_mismatched_sizes are handed to the Auto classes; the config carries the task's id2label."""
    import transformers

    calls = {}

    def spy(cls_name):
        real = getattr(transformers, cls_name).from_pretrained

        def from_pretrained(path, *args, **kwargs):
            calls[cls_name] = (path, kwargs)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", from_pretrained)

    for name in ("AutoTokenizer", "AutoConfig", "AutoModelForSequenceClassification"):
        spy(name)
    other = tmp_path / "config_only"
    other.mkdir()
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    cfg["hidden_dropout_prob"] = 0.0
    (other / "config.json").write_text(json.dumps(cfg))
    _, model = load_tokenizer_and_model(tiny_model_dir, get_task("rte"), "classification", config_path=str(other),
                                        tokenizer_path=tiny_model_dir, revision="v1", trust_remote_code=True,
                                        ignore_mismatched_sizes=True, use_fast=False)
    assert calls["AutoConfig"][0] == str(other) and model.config.hidden_dropout_prob == 0.0
    assert calls["AutoTokenizer"][1]["use_fast"] is False
    for name in calls:
        assert calls[name][1]["revision"] == "v1" and calls[name][1]["trust_remote_code"] is True
    assert calls["AutoModelForSequenceClassification"][1]["ignore_mismatched_sizes"] is True
    assert model.config.id2label == {0: "entailment", 1: "not_entailment"}
    assert model.config.label2id == {"entailment": 0, "not_entailment": 1}


def test_a_head_of_another_size_needs_ignore_mismatched_sizes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    three = tmp_path / "three_labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).save_pretrained(three)
    with pytest.raises(BertAccumError, match="pass --ignore_mismatched_sizes"):
        load_tokenizer_and_model(str(three), get_task("sst2"), "classification", tokenizer_path=tiny_model_dir)
    _, model = load_tokenizer_and_model(str(three), get_task("sst2"), "classification", tokenizer_path=tiny_model_dir,
                                        ignore_mismatched_sizes=True)
    assert model.config.num_labels == 2


def test_hub_flags_offline_say_what_is_missing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BertAccumError) as info:
        load_tokenizer_and_model("no-such-org/no-such-model", get_task("sst2"), "classification", revision="v2")
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message and "--model_revision" in message and "\n" not in message


def test_masked_lm_logits_score_only_masked_positions_through_the_models_own_forward(tiny_model_dir):
    """Same logits as scoring every position, the top-level forward still runs (autocast, DDP and dropout hooks
    hang there), and the head's pre-hook is gone afterwards."""
    import torch
    from transformers import AutoModelForMaskedLM

    from bert_accum.core.modeling import masked_lm_logits

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 40, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[0, 5] = ids[:, 2], 7
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(out.logits.shape))
    logits, scored = masked_lm_logits(model, batch, labels)
    assert calls == [torch.Size([4, model.config.vocab_size])]  # the head saw the 4 masked positions only
    assert scored.tolist() == labels[labels != -100].tolist()
    torch.testing.assert_close(logits, model(**batch).logits[labels != -100], rtol=1e-5, atol=1e-6)
    assert not model.cls._forward_pre_hooks
