"""The training objective (`surge_hf.training.objective`) and `SurgeTrainer`: the auxiliary loss counted once, every
distillation term reaching the student's gradient, and a real `transformers.Trainer` run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from surge_hf import (
    DistillationConfig,
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeTrainer,
    binarize,
    collect_auxiliary_loss,
    compute_loss,
)
from surge_hf.training.objective import hidden_relations_loss, layerwise_mse

AUX = SurgeConfig(aux_loss_weight=0.5)


def bert_config(**changes) -> BertConfig:
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  attn_implementation="eager")
    fields.update(changes)
    return BertConfig(**fields)


def student(recipe: SurgeConfig = AUX) -> SurgeBertForSequenceClassification:
    torch.manual_seed(0)
    model = SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(bert_config(), surge_config=recipe))
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    return model


def teacher(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


def batch(size: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, 99, (size, length), generator=generator),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "labels": torch.randint(0, 3, (size,), generator=generator),
    }


# ------------------------------------------------------------------------------------------- auxiliary loss
def test_auxiliary_loss_is_counted_once_for_surge_models():
    model = student().train()
    data = batch()
    loss, outputs = compute_loss(model, data)
    aux = outputs.aux_loss
    assert aux.item() > 1e-3  # large enough that counting it twice would show
    torch.testing.assert_close(loss, F.cross_entropy(outputs.logits, data["labels"]) + aux)


class _TinyClassifier(nn.Module):
    """A model without a SURGE class: `binarize` only swaps its layers."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.head = nn.Embedding(99, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, labels=None) -> SequenceClassifierOutput:
        logits = self.head(self.hidden(self.embed(input_ids)).mean(dim=1))
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels), logits=logits)


def test_auxiliary_loss_is_counted_once_for_binarized_plain_models():
    torch.manual_seed(0)
    model = binarize(_TinyClassifier(), AUX.replace(target_modules=["hidden"])).train()
    data = batch()
    loss, outputs = compute_loss(model, data)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, data["labels"]))
    with collect_auxiliary_loss() as aux:
        model(**data)
    assert aux.total().item() > 1e-3
    torch.testing.assert_close(loss, outputs.loss + aux.total())


def test_soft_labels_replace_the_task_loss_and_keep_the_auxiliary_loss():
    model = student().train()
    data = batch()
    soft = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(3)), dim=-1)
    loss, outputs = compute_loss(model, {**data, "soft_labels": soft})
    expected = -(soft * F.log_softmax(outputs.logits, dim=-1)).sum(-1).mean() + outputs.aux_loss
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_no_auxiliary_loss_in_eval_or_without_gradients(mode):
    model = student().train(mode != "eval")
    data = batch()
    with torch.set_grad_enabled(mode != "no_grad"):
        loss, outputs = compute_loss(model, data)
    assert outputs.aux_loss is None
    assert torch.equal(loss, F.cross_entropy(outputs.logits, data["labels"]))


# --------------------------------------------------------------------------------------------- distillation
def _reference_term(term: str, outputs, teacher_outputs, temperature: float) -> torch.Tensor:
    """Each distillation term written out from its definition."""
    if term == "logits":
        p_teacher = torch.softmax(teacher_outputs.logits / temperature, dim=-1)
        log_p_student = torch.log_softmax(outputs.logits / temperature, dim=-1)
        kl = (p_teacher * (torch.log(p_teacher) - log_p_student)).sum(-1).mean()
        return temperature**2 * kl
    pairs = list(zip(getattr(outputs, term), getattr(teacher_outputs, term)))
    return sum(((s - t) ** 2).mean() for s, t in pairs) / len(pairs)


def _student_gradient(term: str, teacher_model, trainer: SurgeTrainer | None = None):
    model = student(SurgeConfig()).train()
    weights = {"logits_weight": 0.0, f"{term}_weight": 1.0}
    distillation = DistillationConfig(temperature=2.0, **weights)
    if trainer is None:
        loss, outputs = compute_loss(model, batch(), teacher_model, distillation)
    else:
        trainer.teacher, trainer.distillation = teacher_model, distillation
        loss, outputs = trainer.compute_loss(model, batch(), return_outputs=True)
    loss.backward()
    extra = {"output_hidden_states": True, "output_attentions": True}
    teacher_outputs = teacher_model(**{k: v for k, v in batch().items() if k != "labels"}, **extra)
    torch.testing.assert_close(loss, _reference_term(term, outputs, teacher_outputs, 2.0))
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> SurgeTrainer:
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), report_to="none", use_cpu=True)
    return SurgeTrainer(model=student(), args=args)


@pytest.mark.parametrize("through", ["compute_loss", "SurgeTrainer"])
@pytest.mark.parametrize("term", ["logits", "hidden_states", "attentions"])
def test_the_teacher_reaches_the_student_gradient(term, through, trainer):
    """The loss equals the term's definition, and another teacher gives another gradient (an ignored teacher
    would give the same one)."""
    use = trainer if through == "SurgeTrainer" else None
    first, second = _student_gradient(term, teacher(1), use), _student_gradient(term, teacher(2), use)
    assert first.abs().sum() > 0
    assert not torch.allclose(first, second)


def test_normalized_hidden_state_loss_is_two_minus_twice_the_cosine_per_real_token():
    # token 0: orthogonal directions (cos 0); token 1: the same direction at another scale (cos 1); token 2: padding
    student = (torch.tensor([[[3.0, 0.0], [1.0, 1.0], [5.0, -7.0]]]),)
    teacher = (torch.tensor([[[0.0, 2.0], [4.0, 4.0], [0.0, 0.0]]]),)
    mask = torch.tensor([[1, 1, 0]])
    assert layerwise_mse(student, teacher, "hidden states", mask, normalized=True).item() == pytest.approx(
        ((2 - 2 * 0) + (2 - 2 * 1)) / 2)
    scaled = (teacher[0] * 10,)
    assert layerwise_mse(student, scaled, "hidden states", mask, normalized=True).item() == pytest.approx(1.0)


def test_hidden_relations_loss_compares_token_token_cosines_of_real_tokens():
    # student tokens at cosines [[1, 0], [0, 1]]; teacher tokens parallel: [[1, 1], [1, 1]]; the third is padding
    student = (torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]),) * 2
    teacher = (torch.tensor([[[1.0, 1.0], [5.0, 5.0], [-1.0, 0.0]]]),) * 2
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_relations_loss(student, teacher, mask).item() == pytest.approx((0 + 1 + 1 + 0) / 4)
    # unmasked: all 9 pairs (cos(s_2, s_0) = cos(s_2, s_1) = 1/sqrt2; teacher: cos(t_2, t_0) = -1/sqrt2)
    r = 2 ** -0.5
    s_rel = torch.tensor([[1, 0, r], [0, 1, r], [r, r, 1]])
    t_rel = torch.tensor([[1, 1, -r], [1, 1, -r], [-r, -r, 1]])
    assert hidden_relations_loss(student, teacher).item() == pytest.approx(((s_rel - t_rel) ** 2).mean().item())
    with pytest.raises(ValueError, match=r"Cannot distil hidden-state relations: the student has 2 and the teacher "
                                         r"1\. Use a teacher with the student's number of layers"):
        hidden_relations_loss(student, teacher[:1])


@pytest.mark.parametrize("form", ["normalized", "relations"])
def test_scale_free_hidden_state_terms_reach_the_student_gradient(form):
    model, data = student(SurgeConfig()).train(), batch()
    weights = ({"hidden_states_weight": 1.0, "hidden_states_loss": "normalized"} if form == "normalized"
               else {"hidden_relations_weight": 1.0})
    gradients = []
    for seed in (1, 2):
        model.zero_grad()
        loss, outputs = compute_loss(model, data, teacher(seed), DistillationConfig(logits_weight=0.0, **weights))
        teacher_hidden = teacher(seed)(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                       output_hidden_states=True).hidden_states
        pairs = list(zip(outputs.hidden_states, teacher_hidden))
        if form == "normalized":
            expected = sum((2 - 2 * F.cosine_similarity(s, t, dim=-1)).mean() for s, t in pairs) / len(pairs)
        else:
            expected = sum(((F.cosine_similarity(s.unsqueeze(2), s.unsqueeze(1), dim=-1)
                             - F.cosine_similarity(t.unsqueeze(2), t.unsqueeze(1), dim=-1)) ** 2).mean()
                           for s, t in pairs) / len(pairs)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert gradients[0].abs().sum() > 0 and not torch.allclose(gradients[0], gradients[1])


def test_distillation_config_refuses_an_unknown_hidden_state_loss():
    with pytest.raises(ValueError, match=r"DistillationConfig.hidden_states_loss='cosine' is not one of mse, "
                                         r"normalized"):
        DistillationConfig(hidden_states_loss="cosine")


def test_label_weight_adds_the_task_loss_without_the_auxiliary_loss():
    model = student().train()
    data = batch()
    distillation = DistillationConfig(label_weight=0.3)
    loss, outputs = compute_loss(model, data, teacher(1), distillation)
    teacher_outputs = teacher(1)(**{k: v for k, v in data.items() if k != "labels"})
    expected = (_reference_term("logits", outputs, teacher_outputs, 1.0)
                + 0.3 * F.cross_entropy(outputs.logits, data["labels"]) + outputs.aux_loss)
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------- transformers.Trainer
class _Examples(Dataset):
    def __init__(self, size: int):
        self.data = batch(size)

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.data.items()}


def _training_arguments(tmp_path, **changes) -> TrainingArguments:
    fields = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**fields, **changes})


def _train(tmp_path, teacher_model=None) -> SurgeBertForSequenceClassification:
    args = _training_arguments(tmp_path)
    model = student()
    trainer = SurgeTrainer(model=model, args=args, train_dataset=_Examples(8), teacher=teacher_model,
                           distillation=DistillationConfig(hidden_states_weight=1.0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.state.global_step == 3
    return model


def test_surge_trainer_trains_and_distils_with_the_trainer_machinery(tmp_path):
    initial = student().state_dict()
    alone = _train(tmp_path / "alone")
    first, second = _train(tmp_path / "t1", teacher(1)), _train(tmp_path / "t2", teacher(2))
    layer = "bert.encoder.layer.0.attention.self.query"
    assert not torch.equal(alone.state_dict()[f"{layer}.weight"], initial[f"{layer}.weight"])
    assert not torch.equal(alone.state_dict()[f"{layer}.aux_weight"], initial[f"{layer}.aux_weight"])
    assert not torch.equal(first.state_dict()[f"{layer}.weight"], second.state_dict()[f"{layer}.weight"])


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path):
    """Two accumulated batches of 2 make the same SGD step as one batch of 4 (the objective is a batch mean)."""
    models = []
    for accumulation, batch_size in ((1, 4), (2, 2)):
        model = student(SurgeConfig())
        args = _training_arguments(tmp_path / str(accumulation), max_steps=1, optim="sgd",
                                   per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        SurgeTrainer(model=model, args=args, train_dataset=_Examples(4)).train()
        models.append(model.state_dict())
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, msg=name)


# ------------------------------------------------------------------------------------------- embedding mixup
def test_embedding_mixup_mixes_each_models_own_embeddings_with_the_same_draw():
    from surge_hf.training.objective import mix_token_embeddings

    model, reference = student(), teacher(1)
    data = batch()
    data["attention_mask"][0, 5:] = 0
    torch.manual_seed(5)
    student_inputs, teacher_inputs = mix_token_embeddings(model, reference, data, alpha=0.4)
    torch.manual_seed(5)  # the same draws, by hand: the permutation first, then lam ~ Beta(0.4, 0.4)
    permutation = torch.randperm(4)
    lam = torch.distributions.Beta(0.4, 0.4).sample((4, 1, 1))
    for model_, inputs in ((model, student_inputs), (reference, teacher_inputs)):
        table = model_.get_input_embeddings().weight
        expected = lam * table[data["input_ids"]] + (1 - lam) * table[data["input_ids"][permutation]]
        assert torch.equal(inputs["inputs_embeds"], expected)
        assert torch.equal(inputs["attention_mask"],
                           torch.maximum(data["attention_mask"], data["attention_mask"][permutation]))
        assert "labels" not in inputs and "input_ids" not in inputs
    assert student_inputs["inputs_embeds"].requires_grad and not teacher_inputs["inputs_embeds"].requires_grad


def test_embedding_mixup_trains_only_and_excludes_hard_labels():
    config = DistillationConfig(embedding_mixup_alpha=0.4)
    model, reference = student().eval(), teacher(1)
    with torch.no_grad():
        mixed_off, _ = compute_loss(model, batch(), reference, DistillationConfig())
        in_eval, _ = compute_loss(model, batch(), reference, config)
    assert torch.equal(mixed_off, in_eval)
    model.train()
    torch.manual_seed(0)
    mixed, _ = compute_loss(model, batch(), reference, config)
    torch.manual_seed(0)
    plain, _ = compute_loss(model, batch(), reference, DistillationConfig())
    assert not torch.equal(mixed, plain)
    with pytest.raises(ValueError, match=r"embedding_mixup_alpha=0.4 mixes two inputs.*set label_weight=0"):
        DistillationConfig(embedding_mixup_alpha=0.4, label_weight=1.0)
