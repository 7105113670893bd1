"""Binary BERT trained with SURGE: the transformers BERT classes with the recipe's Linear layers binarized.

Every class is the transformers class of the same task (same forward, same outputs, same losses, including
`problem_type` for sequence classification) with three differences:

- `__init__` builds the network with a `SurgeBertModel` inside and then binarizes what `config.surge_config` targets
  (default: every Linear in the encoder layers; embeddings, pooler and heads stay full precision), as packed
  `BinaryLinear` layers when `config.surge_packed`;
- in training mode with labels, `loss` includes the auxiliary-branch loss of the recipe;
- checkpoints come in a train and a packed form (see `modeling_utils`).

A plain BERT checkpoint loads with `SurgeBertFor...from_pretrained(path)`: its weights become the latent weights and
only SURGE-only tensors (and heads absent from the checkpoint) are reported missing.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertPreTrainedModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput

from .configuration_surge_bert import SurgeBertConfig
from .modeling_utils import SurgePreTrainedMixin, with_auxiliary_loss


class SurgeBertPreTrainedModel(SurgePreTrainedMixin, BertPreTrainedModel):
    """Base class of the SURGE BERT models: config class, weight init of SURGE-only tensors, checkpoint forms."""

    config: SurgeBertConfig
    config_class = SurgeBertConfig


class SurgeBertModel(SurgeBertPreTrainedModel, BertModel):
    """`BertModel` with binarized encoder layers.

    Args:
        config: the model configuration.
        add_pooling_layer: as in `BertModel`.
        apply_surge: binarize this model per the recipe; the task models pass False and binarize themselves, so
            that recipe module names are relative to the model the user holds.
    """

    def __init__(self, config: SurgeBertConfig, add_pooling_layer: bool = True, apply_surge: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        if apply_surge:
            self._apply_surge()


def _classifier_dropout(config: SurgeBertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


# The task models restate the transformers `__init__` bodies (which build a plain `BertModel`) with a
# `SurgeBertModel`, so that the SURGE weight init also reaches the layers inside it.
class SurgeBertForSequenceClassification(SurgeBertPreTrainedModel, BertForSequenceClassification):
    """`BertForSequenceClassification` (single label, multi label or regression) with binarized encoder layers."""

    def __init__(self, config: SurgeBertConfig):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = SurgeBertModel(config, apply_surge=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._apply_surge()

    forward = with_auxiliary_loss(BertForSequenceClassification.forward, SequenceClassifierOutput)


class SurgeBertForTokenClassification(SurgeBertPreTrainedModel, BertForTokenClassification):
    """`BertForTokenClassification` with binarized encoder layers."""

    def __init__(self, config: SurgeBertConfig):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = SurgeBertModel(config, add_pooling_layer=False, apply_surge=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._apply_surge()

    forward = with_auxiliary_loss(BertForTokenClassification.forward, TokenClassifierOutput)


class SurgeBertForQuestionAnswering(SurgeBertPreTrainedModel, BertForQuestionAnswering):
    """`BertForQuestionAnswering` (span start/end logits) with binarized encoder layers."""

    def __init__(self, config: SurgeBertConfig):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = SurgeBertModel(config, add_pooling_layer=False, apply_surge=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self._apply_surge()

    forward = with_auxiliary_loss(BertForQuestionAnswering.forward, QuestionAnsweringModelOutput)


SurgeBertModel.register_for_auto_class("AutoModel")
SurgeBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
SurgeBertForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
SurgeBertForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "SurgeBertForQuestionAnswering",
    "SurgeBertForSequenceClassification",
    "SurgeBertForTokenClassification",
    "SurgeBertModel",
    "SurgeBertPreTrainedModel",
]
