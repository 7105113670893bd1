"""Binary BERT as a transformers model: config, binarized targets, loading plain BERT checkpoints, losses (with the
auxiliary term), the usual transformers features, and training with `transformers.Trainer`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Trainer,
    TrainingArguments,
)

from surge_hf import (
    SurgeBertConfig,
    SurgeBertForQuestionAnswering,
    SurgeBertForSequenceClassification,
    SurgeBertForTokenClassification,
    SurgeBertModel,
    SurgeConfig,
    SurgeLinear,
)

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")
SURGE_ONLY = ("aux_weight", "input_threshold", "input_scale")


def bert_config(**changes) -> BertConfig:
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(changes)
    return BertConfig(**fields)


def surge_config(recipe: SurgeConfig | None = None, **changes) -> SurgeBertConfig:
    return SurgeBertConfig.from_bert_config(bert_config(**changes), surge_config=recipe)


def model_for(cls, recipe: SurgeConfig | None = None, **changes):
    torch.manual_seed(0)
    return cls(surge_config(recipe, **changes))


def inputs(batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, 99, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# --------------------------------------------------------------------------------------------------- config
def test_config_holds_the_validated_recipe_and_writes_it_as_a_plain_dict():
    recipe = SurgeConfig(compensator="fixed", eta=0.5)
    config = surge_config(recipe)
    assert config.model_type == "surge_bert"
    assert config.surge_config is recipe
    assert config.to_dict()["surge_config"] == recipe.to_dict() and "surge" not in config.to_dict()
    assert config.surge_packed is False
    assert config.hidden_size == 32 and config.num_labels == 3
    assert SurgeBertConfig(hidden_size=64).surge_config == SurgeConfig()
    config.surge_config = {"compensator": "ste"}
    assert config.surge_config == SurgeConfig(compensator="ste")


@pytest.mark.parametrize("recipe", [SurgeConfig(), SurgeConfig(target_modules=["query", "value"],
                                                               aux_loss_weight=0.25)])
def test_config_json_round_trip(tmp_path, recipe):
    config = surge_config(recipe)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["surge_config"] == recipe.to_dict()  # also the default recipe: the file always names it
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SurgeBertConfig
    assert loaded.surge_config == config.surge_config and loaded.surge_packed is False
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.to_json_string() == config.to_json_string()


def test_config_from_plain_bert_checkpoint_and_recipe_override(tmp_path):
    bert_config().save_pretrained(tmp_path)
    loaded = SurgeBertConfig.from_pretrained(tmp_path, surge={"eta": 0.3})
    assert loaded.model_type == "surge_bert" and loaded.hidden_size == 32
    assert loaded.surge_config == SurgeConfig(eta=0.3)
    assert SurgeBertConfig.from_pretrained(tmp_path).surge_config == SurgeConfig()


def test_from_base_config_keeps_a_surge_recipe_unless_replaced():
    config = surge_config(SurgeConfig(eta=0.7))
    assert SurgeBertConfig.from_bert_config(config).surge_config.eta == 0.7
    assert SurgeBertConfig.from_bert_config(config, surge_config=SurgeConfig(eta=0.2)).surge_config.eta == 0.2
    assert SurgeBertConfig.from_bert_config(config, num_labels=5).num_labels == 5


def test_config_rejects_bad_recipes_and_flags():
    with pytest.raises(ValueError, match=re.escape("Unknown SURGE recipe key(s) ['etta']")):
        SurgeBertConfig(surge_config={"etta": 0.1})
    with pytest.raises(ValueError, match=exact("SurgeConfig.eta=-1.0 must be >= 0.")):
        surge_config().surge_config = {"eta": -1.0}
    with pytest.raises(TypeError, match=exact("surge_config must be a SurgeConfig, a dict or None, got str.")):
        SurgeBertConfig(surge_config="surge")
    with pytest.raises(ValueError, match=re.escape("The SURGE recipe of a SurgeBertConfig is `surge_config`")):
        SurgeBertConfig(surge={"eta": 0.1})
    with pytest.raises(ValueError, match=exact("surge_packed must be True or False, got 'yes'.")):
        SurgeBertConfig(surge_packed="yes")


def test_config_rejects_other_architectures(tmp_path):
    AutoConfig.for_model("gpt2").save_pretrained(tmp_path)
    message = ("SurgeBertConfig builds on a `bert` config, but this config has model_type `gpt2`. Load it with the "
               "matching class (or AutoConfig after `import surge_hf`).")
    with pytest.raises(ValueError, match=exact(message)):
        SurgeBertConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=exact(
            "SurgeBertConfig.from_base_config needs a `bert` config, got model_type `gpt2`.")):
        SurgeBertConfig.from_bert_config(AutoConfig.for_model("gpt2"))


# ------------------------------------------------------------------------------------------ binarized layers
@pytest.mark.parametrize(
    ("cls", "full_precision_linears"),
    [(SurgeBertModel, {"pooler.dense"}), (SurgeBertForSequenceClassification, {"bert.pooler.dense", "classifier"}),
     (SurgeBertForTokenClassification, {"classifier"}), (SurgeBertForQuestionAnswering, {"qa_outputs"})],
)
def test_default_recipe_binarizes_exactly_the_encoder_linears(cls, full_precision_linears):
    model = model_for(cls)
    prefix = "" if cls is SurgeBertModel else "bert."
    expected = {f"{prefix}encoder.layer.{i}.{name}" for i in range(2) for name in ENCODER_LINEARS}
    assert {name for name, module in model.named_modules() if isinstance(module, SurgeLinear)} == expected
    assert {name for name, module in model.named_modules() if type(module) is nn.Linear} == full_precision_linears


def test_recipe_names_modules_of_the_model_the_user_holds():
    recipe = SurgeConfig(target_modules=r"bert\.encoder\.layer\.1\.output\.dense|classifier", compensator="ste")
    model = model_for(SurgeBertForSequenceClassification, recipe)
    binarized = {name for name, module in model.named_modules() if isinstance(module, SurgeLinear)}
    assert binarized == {"bert.encoder.layer.1.output.dense", "classifier"}
    assert model.classifier.aux_weight is None


def test_fresh_model_initialises_surge_parameters():
    model = model_for(SurgeBertForSequenceClassification, SurgeConfig(activation_binarizer="elastic",
                                                                      lambda_placement="previous"))
    for name in ENCODER_LINEARS:
        layer = model.bert.encoder.layer[1].get_submodule(name)
        assert torch.equal(layer.aux_weight, layer.weight)
        assert torch.equal(layer.input_threshold, torch.zeros_like(layer.input_threshold))
        assert torch.equal(layer.input_scale, torch.ones(1))
        assert layer.previous_lambda.item() == 0.0
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.25)  # BERT's normal(0, 0.02) init


# ---------------------------------------------------------------------------------- plain BERT checkpoints
def test_plain_bert_checkpoint_becomes_the_latent_weights(tmp_path):
    torch.manual_seed(3)
    plain = BertForSequenceClassification(bert_config())
    plain.save_pretrained(tmp_path)
    model, info = SurgeBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    expected_missing = {f"bert.encoder.layer.{i}.{name}.{param}" for i in range(2) for name in ENCODER_LINEARS
                        for param in SURGE_ONLY}
    assert info["missing_keys"] == expected_missing
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    plain_state = plain.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith(SURGE_ONLY):
            continue
        assert torch.equal(value, plain_state[key]), key
    for name, layer in model.named_modules():
        if isinstance(layer, SurgeLinear):
            assert torch.equal(layer.aux_weight, plain_state[f"{name}.weight"]), name
            assert torch.equal(layer.input_threshold, torch.zeros_like(layer.input_threshold)), name


def test_plain_base_checkpoint_loads_into_every_head(tmp_path):
    torch.manual_seed(4)
    BertModel(bert_config()).save_pretrained(tmp_path)
    surge_only = {f"bert.encoder.layer.{i}.{name}.{param}" for i in range(2) for name in ENCODER_LINEARS
                  for param in SURGE_ONLY}
    for cls, head in [(SurgeBertForSequenceClassification, "classifier"),
                      (SurgeBertForTokenClassification, "classifier"),
                      (SurgeBertForQuestionAnswering, "qa_outputs")]:
        model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        assert info["missing_keys"] == surge_only | {f"{head}.weight", f"{head}.bias"}, cls.__name__
        layer = model.bert.encoder.layer[0].intermediate.dense
        assert torch.equal(layer.aux_weight, layer.weight)


def test_num_labels_and_id2label_overrides(tmp_path):
    BertModel(bert_config()).save_pretrained(tmp_path / "base")
    id2label = {0: "neg", 1: "neu", 2: "pos", 3: "mixed"}
    model = SurgeBertForSequenceClassification.from_pretrained(tmp_path / "base", id2label=id2label)
    assert model.config.num_labels == 4 and model.config.id2label == id2label
    assert model.classifier.out_features == 4
    model.save_pretrained(tmp_path / "four")
    five = SurgeBertForSequenceClassification.from_pretrained(tmp_path / "four", num_labels=5,
                                                              ignore_mismatched_sizes=True)
    assert five.classifier.out_features == 5 and five.config.num_labels == 5


# ------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize(
    ("problem_type", "num_labels", "labels", "task_loss"),
    [
        ("single_label_classification", 3, torch.tensor([0, 2]), lambda logits, y: F.cross_entropy(logits, y)),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
         lambda logits, y: F.binary_cross_entropy_with_logits(logits, y)),
        ("regression", 1, torch.tensor([0.5, -1.5]), lambda logits, y: F.mse_loss(logits.squeeze(), y)),
    ],
)
def test_sequence_classification_losses_include_the_auxiliary_loss(problem_type, num_labels, labels, task_loss):
    recipe = SurgeConfig(aux_loss_weight=0.5)
    model = model_for(SurgeBertForSequenceClassification, recipe, num_labels=num_labels, problem_type=problem_type)
    model.eval()
    evaluated = model(**inputs(), labels=labels)
    assert torch.equal(evaluated.loss, task_loss(evaluated.logits, labels))
    model.train()
    assert evaluated.aux_loss is None
    trained = model(**inputs(), labels=labels)
    aux = trained.aux_loss
    assert aux is not None and aux.item() > 0
    assert torch.equal(trained.loss, task_loss(trained.logits, labels) + aux)
    assert model(**inputs()).aux_loss is not None and model(**inputs()).loss is None
    assert model(**inputs(), labels=labels, return_dict=False)[-1] is not None  # aux_loss is the last tuple entry
    trained.loss.backward()
    assert model.bert.encoder.layer[0].output.dense.aux_weight.grad is not None


def test_no_auxiliary_loss_term_without_weight_or_labels():
    model = model_for(SurgeBertForSequenceClassification).train()
    labels = torch.tensor([1, 2])
    out = model(**inputs(), labels=labels)
    assert torch.equal(out.loss, F.cross_entropy(out.logits, labels))
    assert model(**inputs()).loss is None


def test_token_classification():
    model = model_for(SurgeBertForTokenClassification, SurgeConfig(aux_loss_weight=1.0)).train()
    labels = torch.randint(0, 3, (2, 7), generator=torch.Generator().manual_seed(2))
    out = model(**inputs(), labels=labels)
    assert out.logits.shape == (2, 7, 3)
    assert torch.equal(out.loss, F.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1)) + out.aux_loss)


def test_question_answering():
    model = model_for(SurgeBertForQuestionAnswering, num_labels=2).eval()
    start, end = torch.tensor([1, 3]), torch.tensor([2, 5])
    out = model(**inputs(), start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 7)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    assert torch.equal(out.loss, expected)


# ------------------------------------------------------------------------------ transformers model features
def test_return_dict_false_hidden_states_and_attentions():
    model = model_for(SurgeBertForSequenceClassification).eval()
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    labels = torch.tensor([0, 1])
    out = model(**inputs(), labels=labels, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 7, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 7, 7)
    as_tuple = model(**inputs(), labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    model.config.return_dict = False
    assert isinstance(model(**inputs()), tuple)
    base = model_for(SurgeBertModel).eval()
    assert base(**inputs()).pooler_output.shape == (2, 32)


def test_auto_classes_build_surge_models_from_config():
    config = surge_config()
    assert type(AutoModel.from_config(config)) is SurgeBertModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is SurgeBertForSequenceClassification
    assert type(AutoModelForTokenClassification.from_config(config)) is SurgeBertForTokenClassification
    assert type(AutoModelForQuestionAnswering.from_config(config)) is SurgeBertForQuestionAnswering


def test_resize_token_embeddings_and_round_trip(tmp_path):
    model = model_for(SurgeBertForSequenceClassification).eval()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120 and model.bert.embeddings.word_embeddings.num_embeddings == 120
    ids = torch.tensor([[1, 119, 118, 5]])
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(SurgeBertForSequenceClassification.from_pretrained(tmp_path)(input_ids=ids).logits, logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = model_for(SurgeBertForSequenceClassification, SurgeConfig(aux_loss_weight=0.1)).train()
    labels = torch.tensor([0, 2])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**inputs(), labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.bert.encoder.layer[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_dtype_on_load(tmp_path):
    model_for(SurgeBertForSequenceClassification).save_pretrained(tmp_path)
    model = SurgeBertForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    layer = model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(layer.aux_weight, layer.weight)
    assert model.eval()(**inputs()).logits.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------- training
class _Rows(torch.utils.data.Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(1, 99, (count, 8), generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def _trainer(model, tmp_path, **changes) -> Trainer:
    args = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=1e-2,
                report_to="none", use_cpu=True, logging_strategy="no", save_strategy="no", seed=0, disable_tqdm=True,
                lr_scheduler_type="constant")
    arguments = TrainingArguments(**{**args, **changes})
    return Trainer(model=model, args=arguments, train_dataset=_Rows(16))


def test_trainer_trains_latent_and_auxiliary_weights(tmp_path):
    model = model_for(SurgeBertForSequenceClassification, SurgeConfig(aux_loss_weight=0.1))
    layer = model.bert.encoder.layer[0].intermediate.dense
    weight, aux_weight, threshold = (t.detach().clone() for t in (layer.weight, layer.aux_weight,
                                                                  layer.input_threshold))
    result = _trainer(model, tmp_path, max_steps=3).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(layer.weight, weight)
    assert not torch.equal(layer.aux_weight, aux_weight)
    assert not torch.equal(layer.input_threshold, threshold)


def test_trainer_checkpoint_resumes_to_the_same_weights(tmp_path):
    recipe = SurgeConfig(aux_loss_weight=0.1, lambda_placement="previous")
    straight = model_for(SurgeBertForSequenceClassification, recipe)
    _trainer(straight, tmp_path / "straight", max_steps=4).train()
    first = model_for(SurgeBertForSequenceClassification, recipe)
    _trainer(first, tmp_path / "resumed", max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "resumed" / "trainer" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed = SurgeBertForSequenceClassification.from_pretrained(checkpoint)
    _trainer(resumed, tmp_path / "resumed", max_steps=4, save_steps=2).train(resume_from_checkpoint=str(checkpoint))
    final, expected = resumed.state_dict(), straight.state_dict()
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
