"""Pooling cross-encoders (``kind: pooling``): token states -> pooling -> dense layers -> score.

Sentence-Transformers saves a modular cross-encoder as one directory whose ``modules.json``
lists its modules in order; this family loads the layout

    Transformer (``path``: the transformers checkpoint, usually the directory itself)
    -> Pooling  (``1_Pooling/config.json``: ``pooling_mode``, one mode or several concatenated)
    -> Dense... (``2_Dense/config.json`` + weights: ``in_features``, ``out_features``, ``bias``,
                 ``activation_function``; the last one has ``out_features: 1``)

as it is, and scores a pair as the last Dense layer's single output (the raw score that
``CrossEncoder.predict(..., activation_fn=Identity())`` returns). Pooling modes: ``cls``
(first real token), ``max``, ``mean``, ``mean_sqrt_len_tokens``, ``weightedmean`` (weights
1, 2, ... from the first real token) and ``lasttoken`` (last real token), all under the
attention mask. Pairs are tokenised like the classification cross-encoder's
(:class:`~serve_app.rerank.pairs.PairTokenizer`).

A layout with anything else (a prompt, a Normalize or Router module, a module of another
library) is refused with the module named, rather than scored differently from the original.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from serve_app.config import RerankerModelConfig
from serve_app.models import ModelLoadError, effective_max_length, load_pretrained, pick_device
from serve_app.rerank.checkpoint import Checkpoint, DenseSpec, PoolingLayout
from serve_app.rerank.device import reranker_dtype, set_threads
from serve_app.rerank.pairs import PairTokenizer
from serve_app.rerank.scorer import PairScorer

logger = logging.getLogger(__name__)


def _pooling_score_class() -> Any:
    import torch

    def pool(hidden: Any, mask: Any, mode: str) -> Any:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            first = mask.long().argmax(1)
            return hidden.gather(1, first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        if mode == "lasttoken":
            last = mask.shape[1] - 1 - mask.long().flip(1).argmax(1)
            return hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        if mode == "max":
            return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        if mode == "weightedmean":
            first = mask.long().argmax(1, keepdim=True)
            weights = (torch.arange(1, mask.shape[1] + 1, device=mask.device).unsqueeze(0) - first).to(hidden.dtype).unsqueeze(-1) * m
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        total = (hidden * m).sum(1)
        count = m.sum(1).clamp(min=1e-9)
        return total / (count if mode == "mean" else count.sqrt())

    class _PoolingScore(torch.nn.Module):
        def __init__(self, encoder: Any, modes: tuple[str, ...], dense: list[tuple[Any, Any]]) -> None:
            super().__init__()
            self.encoder = encoder
            self.modes = modes
            self.linears = torch.nn.ModuleList([lin for lin, _ in dense])
            self.activations = torch.nn.ModuleList([act for _, act in dense])

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state.float()
            x = torch.cat([pool(hidden, attention_mask, mode) for mode in self.modes], dim=-1)
            for linear, activation in zip(self.linears, self.activations):
                x = activation(linear(x.to(linear.weight.dtype)).float())
            return x[:, 0]

    return _PoolingScore


def _dense_layer(spec: DenseSpec) -> tuple[Any, Any]:
    import torch

    linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
    if spec.weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(spec.weights))
    else:
        state = torch.load(str(spec.weights), map_location="cpu", weights_only=True)
    state = {k.removeprefix("linear."): v for k, v in state.items()}
    try:
        linear.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{spec.weights}: Dense weights do not fit Linear({spec.in_features}, {spec.out_features}): {exc}") from exc
    return linear, getattr(torch.nn, spec.activation)()


class PoolingScorer(PairScorer):
    """Scores pairs with a Sentence-Transformers modular cross-encoder (see the module docstring)."""

    kind = "pooling"

    def __init__(self, cfg: RerankerModelConfig, layout: PoolingLayout, *, num_threads: Optional[int] = None, dtype: Any = None, checkpoint: Optional[Checkpoint] = None) -> None:
        device = pick_device(cfg.device)
        dtype = dtype if dtype is not None else reranker_dtype(cfg, device)
        set_threads(num_threads)
        source = checkpoint.source if checkpoint is not None else None
        tokenizer, encoder = load_pretrained(cfg.model, "pooling cross-encoder", head="encoder", dtype=dtype, subfolder=layout.transformer_path, source=source)
        dense = [_dense_layer(d) for d in layout.dense]
        module = _pooling_score_class()(encoder, layout.modes, dense).to(device=device, dtype=dtype).eval()
        self.layout = layout
        max_length = effective_max_length(cfg.max_length, tokenizer, encoder.config, what="reranker.max_length")
        self._setup(cfg, tokenizer, PairTokenizer(tokenizer, max_length), module, device, dtype)

    def export_key(self) -> dict[str, Any]:
        """What the exported score module depends on besides the checkpoint's files."""
        return {"kind": self.kind, "modes": list(self.layout.modes)}
