"""Decoder rerankers (``kind: causal_lm``): a causal language model asked whether a document
meets the query.

The Qwen3-Reranker family (and rerankers trained the same way) read one prompt holding the
instruction, the query and the document, and score relevance as the next token being "yes"
rather than "no"::

    score = logit("yes") - logit("no")      at the prompt's last position
    sigmoid(score) = P(yes)                 (softmax over the two tokens; activation: sigmoid)

With ``prompt.no_token: null`` the score is ``logit(yes)`` alone (bge-reranker-v2-gemma).

:class:`PromptTokenizer` builds the prompt's token ids from a :class:`~serve_app.config.PromptConfig`
(``prefix`` + ``template`` with ``{instruction}``, ``{query}``, ``{document}`` + ``suffix``):
the prefix and the suffix are tokenised on their own, the template once as a whole (so token
boundaries are those of the model's reference implementation, which tokenises the filled
template as one text), and only the *document's* tokens are cut when the prompt would exceed
the pair limit: the query, the instruction and the template always stay whole (a query whose
prompt alone exceeds ``max_length`` is refused, never cut).

:class:`CausalLMScorer` batches prompts like the cross-encoder (token budget, length-sorted,
the coalescer upstream). Its score module runs the decoder without its LM head, reads the
hidden state at each row's last real token (right or left padding: positions are counted from
each row's first real token, so both give the same scores) and projects it on the answer
tokens' rows of the output embedding only, so no vocabulary-wide logits are computed. At load
the module is checked against the full model's logits on one prompt, so an architecture that
post-processes its logits in a way not reproduced here is refused instead of scored wrongly
(final logit soft-capping, as in Gemma 2, is reproduced).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from serve_app.config import RerankerModelConfig, PromptConfig
from serve_app.errors import InputTooLong
from serve_app.models import ModelLoadError, effective_max_length, load_pretrained, pick_device
from serve_app.rerank.checkpoint import Checkpoint
from serve_app.rerank.device import reranker_dtype, set_threads
from serve_app.rerank.pairs import check_pairs, limits_for
from serve_app.rerank.scorer import PairScorer

logger = logging.getLogger(__name__)

#: The prompt on which the score module is checked against the full model's logits at load.
SELF_CHECK_PAIR = ("what powers the sun", "The Sun shines because hydrogen nuclei in its core fuse into helium.")


class PromptTokenizer:
    """(query, document) pairs -> the token ids of a decoder reranker's prompt.

    Same interface as :class:`serve_app.rerank.pairs.PairTokenizer`, with an optional
    instruction per pair (None: ``prompt.instruction``).
    """

    def __init__(self, tokenizer: Any, prompt: PromptConfig, max_length: int, padding_side: str = "right") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError("a decoder reranker needs a fast (Rust) tokenizer: the document's tokens are found by character offsets")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_length = int(max_length)
        self.padding_side = padding_side
        self.prefix_ids: list[int] = self._ids(prompt.prefix)
        self.suffix_ids: list[int] = self._ids(prompt.suffix)
        self.special_tokens = len(self.prefix_ids) + len(self.suffix_ids)
        self.min_pair_length = self.special_tokens + 2
        self.yes_id = self._single_token(prompt.yes_token)
        self.no_id = self._single_token(prompt.no_token) if prompt.no_token is not None else None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def _single_token(self, token: str) -> int:
        ids = self._ids(token)
        if len(ids) != 1:
            raise ModelLoadError(f"the decoder reranker's answer token {token!r} is {len(ids)} tokens in this tokenizer; it must be exactly one (prompt.yes_token / prompt.no_token)")
        return ids[0]

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` alone."""
        return self._ids(text)

    def _render(self, query: str, instruction: Optional[str]) -> tuple[str, str]:
        """The template's text before and after the document."""
        head, tail = self.prompt.template.split("{document}")
        fields = {"instruction": instruction if instruction is not None else self.prompt.instruction, "query": query}
        return head.format(**fields), tail.format(**fields)

    def query_overhead(self, query: str, instruction: Optional[str] = None) -> int:
        """Tokens a prompt spends on everything but the document (prefix, template, query, suffix)."""
        head, tail = self._render(query, instruction)
        return self.special_tokens + len(self._ids(head + tail))

    def limits(self, n: int, max_length: int | Sequence[int] | None) -> list[int]:
        """Per-pair limits: ``max_length`` (one int or one per pair) capped to :attr:`max_length`."""
        return limits_for(n, max_length, self.max_length, self.min_pair_length)

    def check_fits(self, query: str, instruction: Optional[str] = None) -> None:
        """:class:`~serve_app.errors.InputTooLong` when the prompt without its document already
        exceeds :attr:`max_length` (the query and the instruction are never cut)."""
        need = self.query_overhead(query, instruction) + 1
        if need > self.max_length:
            raise InputTooLong(f"the query with the prompt template and instruction takes {need - 1} tokens; the reranker reads {self.max_length} per prompt (reranker.max_length), so no document token would fit (the query and the instruction are never cut): send a shorter query or instruction")

    def encode(self, query: str, document: str, limit: int, instruction: Optional[str] = None) -> list[int]:
        """The prompt's token ids, the document cut (from its end) so that the prompt fits ``limit``
        tokens; :class:`~serve_app.errors.InputTooLong` when not one document token would fit."""
        head, tail = self._render(query, instruction)
        text = head + document + tail
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start, end = len(head), len(head) + len(document)
        in_doc = [start <= s < end for s, _ in offsets]  # a token that starts inside the document is the document's
        n_doc = sum(in_doc)
        budget = limit - self.special_tokens - (len(ids) - n_doc)
        if budget < 1:
            raise InputTooLong(f"the query with the prompt template and instruction takes {limit - budget} of the {limit} tokens of this prompt: no document token fits (the query and the instruction are never cut)")
        if budget < n_doc:
            keep = budget
            kept, seen = [], 0
            for token, inside in zip(ids, in_doc):
                if inside:
                    seen += 1
                    if seen > keep:
                        continue
                kept.append(token)
            ids = kept
        return self.prefix_ids + ids + self.suffix_ids

    def features(self, pairs: Sequence[tuple[str, str]], limits: Sequence[int], instructions: Optional[Sequence[Optional[str]]] = None) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        check_pairs(pairs)
        out = []
        for i, pair in enumerate(pairs):
            ids = self.encode(pair[0], pair[1], limits[i], instructions[i] if instructions is not None else None)
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out

    def pad(self, features: Sequence[dict[str, list[int]]], side: Optional[str] = None) -> dict[str, Any]:
        """One padded batch of features, as torch tensors (``side``: where the padding goes;
        default :attr:`padding_side`)."""
        import torch

        side = side or self.padding_side
        width = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[row, cols] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _last_token_score_class() -> Any:
    import torch

    class _LastTokenScore(torch.nn.Module):
        """Decoder hidden state at each row's last real token -> answer-token logits -> score."""

        def __init__(self, decoder: Any, rows: Any, bias: Any, softcap: Optional[float]) -> None:
            super().__init__()
            self.decoder = decoder
            self.register_buffer("rows", rows.detach().clone())  # (1 or 2, hidden): W[yes] (, W[no])
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
            self.softcap = softcap

        def answer_logits(self, input_ids: Any, attention_mask: Any) -> Any:
            """(rows, 1 or 2) float32 logits of the answer tokens at each row's last real token."""
            mask = attention_mask.long()
            # Positions count from each row's first real token: left padding shifts nothing.
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last 1 of each row's mask
            index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            h = hidden.gather(1, index).squeeze(1).float()
            logits = h @ self.rows.float().T
            if self.bias is not None:
                logits = logits + self.bias.float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            logits = self.answer_logits(input_ids, attention_mask)
            return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]

    return _LastTokenScore


class CausalLMScorer(PairScorer):
    """Scores (query, document) pairs with a decoder reranker (see the module docstring).

    >>> # doctest: +SKIP
    >>> from serve_app.config import RerankerModelConfig
    >>> scorer = CausalLMScorer(RerankerModelConfig(model="Qwen/Qwen3-Reranker-0.6B", kind="causal_lm", activation="sigmoid"))
    >>> scorer.score([("what is the capital of China?", "The capital of China is Beijing.")])  # P(yes)
    """

    kind = "causal_lm"
    accepts_instruction = True

    def __init__(self, cfg: RerankerModelConfig, *, num_threads: Optional[int] = None, dtype: Any = None, checkpoint: Optional[Checkpoint] = None) -> None:
        device = pick_device(cfg.device)
        dtype = dtype if dtype is not None else reranker_dtype(cfg, device)
        set_threads(num_threads)
        source = checkpoint.source if checkpoint is not None else None
        tokenizer, model = load_pretrained(cfg.model, "decoder reranker", head="causal_lm", dtype=dtype, source=source)
        model = model.to(device=device, dtype=dtype).eval()
        max_length = effective_max_length(cfg.max_length, tokenizer, model.config, what="reranker.max_length")
        pairs = PromptTokenizer(tokenizer, cfg.prompt, max_length, cfg.padding_side)
        fixed = pairs.query_overhead("") + 2  # the prompt around a one-token query and document
        if fixed > max_length:
            raise ModelLoadError(f"reranker.max_length={max_length} leaves no room for a query and a document: the prompt (prefix, template, instruction, suffix) alone takes {fixed - 2} tokens of {cfg.model!r}")
        module = self._score_module(model, pairs)
        self._setup(cfg, tokenizer, pairs, module, device, dtype)
        self._check_against(model)

    @staticmethod
    def _score_module(model: Any, pairs: PromptTokenizer) -> Any:
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ModelLoadError(f"{type(model).__name__} has no output embedding to read the answer tokens' logits from")
        ids = [pairs.yes_id] + ([pairs.no_id] if pairs.no_id is not None else [])
        rows = head.weight[ids]
        bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return _last_token_score_class()(decoder, rows, bias, softcap)

    def _check_against(self, model: Any) -> None:
        """Refuse the model unless the score module equals the full model's answer-token logits
        on one prompt (an architecture that scales or post-processes its logits otherwise)."""
        import torch

        batch = self.pairs.pad(self.pairs.features([SELF_CHECK_PAIR], self.pairs.limits(1, None)))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = [self.pairs.yes_id] + ([self.pairs.no_id] if self.pairs.no_id is not None else [])
        with torch.inference_mode():
            full = model(**batch).logits[:, -1, ids].float()
            ours = self.module.answer_logits(batch["input_ids"], batch["attention_mask"])
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not torch.allclose(full, ours, rtol=tol, atol=tol):
            raise ModelLoadError(
                f"{self.model_name!r} ({type(model).__name__}): the answer-token logits read from the last hidden state "
                f"({ours.tolist()}) differ from the model's own ({full.tolist()}); this architecture post-processes its logits "
                f"in a way serve_app does not reproduce, so it cannot be served as kind causal_lm"
            )

    def export_key(self) -> dict[str, Any]:
        """What the exported score module depends on besides the checkpoint's files."""
        return {"kind": self.kind, "answer_ids": [self.pairs.yes_id, self.pairs.no_id]}

