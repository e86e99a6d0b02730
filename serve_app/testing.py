"""Tiny, deterministic transformers checkpoints for tests, examples and dry runs.

They have the real architecture (BERT) and load through the same code paths as
production models (``from_pretrained`` on a directory), but are built locally in
well under a second from a fixed seed and a small word-piece vocabulary, so the
test suite never needs the network.

>>> import tempfile
>>> d = build_tiny_cross_encoder(tempfile.mkdtemp())
>>> sorted(p.name for p in d.iterdir())[:2]
['config.json', 'model.safetensors']
"""

from __future__ import annotations

import string
from typing import Any, Sequence
from pathlib import Path

# Small vocabulary: specials, letters and digits (so every word can be spelled
# with ## pieces), and a few hundred whole words seen in tests and the demo corpus.
_WORDS = """
the a an of and or in on to for with by from is are was were be been this that these those it its
as at not no but which who what when where why how all any each more most other some such than
too very can will just should now also into over after before under between during through about
protein cell cells gene genes dna rna virus vaccine disease cancer tumor patients clinical trial
study studies result results effect effects risk treatment therapy drug dose blood heart brain
mouse mice human humans expression increase decrease level levels high low response immune
infection model data analysis method methods search engine query document documents ranking
retrieval index vector dense sparse bm25 neural network language text word words token tokens
python ray serve cluster gpu cpu memory latency throughput batch batches server request
ocean sea river water climate weather rain snow temperature carbon energy solar wind power
football soccer tennis match team player players goal season league cup game games
music song album band guitar piano concert film movie actor story book novel author history
war king empire city cities country government election law court economy market price bank
food bread coffee tea wine cheese recipe cooking kitchen garden plant plants tree trees flower
space star stars planet moon sun earth orbit rocket telescope galaxy light physics chemistry
""".split()


def tiny_vocab() -> list[str]:
    """The word-piece vocabulary used by the tiny models (specials first)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    seen: set[str] = set()
    vocab: list[str] = []
    for tok in specials + chars + pieces + _WORDS:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab


def _save_tokenizer(out: Path, max_length: int) -> None:
    from transformers import BertTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_length)
    tok.save_pretrained(str(out))


def _tiny_bert_config(num_labels: int | None, max_position_embeddings: int, hidden_size: int = 32, num_hidden_layers: int = 2):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=len(tiny_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        # Larger than BERT's 0.02 so that random models give clearly different
        # scores to different inputs (parity tests then have something to compare).
        initializer_range=0.3,
    )
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return BertConfig(**kwargs)


def build_tiny_cross_encoder(
    out_dir: str | Path, *, num_labels: int = 1, seed: int = 0, max_position_embeddings: int = 128, hidden_size: int = 32, num_hidden_layers: int = 2
) -> Path:
    """Write a random-weight BERT sequence classifier (``num_labels`` 1 or 2) and its tokenizer to ``out_dir``."""
    import torch
    from transformers import BertForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_bert_config(num_labels, max_position_embeddings, hidden_size, num_hidden_layers))
    model.eval()
    model.save_pretrained(str(out))
    _save_tokenizer(out, max_position_embeddings)
    return out


def build_tiny_bi_encoder(out_dir: str | Path, *, seed: int = 0, max_position_embeddings: int = 128) -> Path:
    """Write a random-weight BERT encoder (mean pooling is applied by serve_app) and its tokenizer."""
    import torch
    from transformers import BertModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = BertModel(_tiny_bert_config(None, max_position_embeddings), add_pooling_layer=False)
    model.eval()
    model.save_pretrained(str(out))
    _save_tokenizer(out, max_position_embeddings)
    return out


#: Added tokens of the tiny decoder tokenizer: the chat markers of the Qwen3-Reranker prompt.
DECODER_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DECODER_ADDED_TOKENS = ["<think>", "</think>"]


def _decoder_training_text() -> list[str]:
    """What the tiny byte-level BPE is trained on: the words alone and with a leading space,
    the answer tokens on their own, and the default prompt's fixed text."""
    from serve_app.config import PromptConfig

    prompt = PromptConfig()
    words = _WORDS + ["yes", "no", "Instruct", "Query", "Document", "Judge", "whether", "meets", "requirements", "based", "provided", "Note", "answer", "only", "system", "user", "assistant", "Given", "web", "passages", "answer"]
    lines = []
    for _ in range(3):  # repeated so that every word becomes one token
        lines += words + [" " + w for w in words] + [" ".join(words)]
    return lines + [prompt.prefix, prompt.template, prompt.suffix, prompt.instruction]


def _save_decoder_tokenizer(out: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=DECODER_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_decoder_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=max_length)
    fast.add_tokens(DECODER_ADDED_TOKENS)
    fast.save_pretrained(str(out))
    return fast


def build_tiny_decoder_reranker(
    out_dir: str | Path,
    *,
    architecture: str = "qwen3",
    seed: int = 0,
    max_position_embeddings: int = 1024,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    dtype: Any = None,
    **config: Any,
) -> Path:
    """Write a random-weight decoder LM (``architecture`` ``qwen3`` or ``llama``) with a byte-level
    BPE tokenizer in which ``yes`` and ``no`` are single tokens and the Qwen3-Reranker prompt's
    chat markers are added tokens, to ``out_dir``: a ``kind: causal_lm`` reranker for tests.

    ``config`` overrides the model config (e.g. a real model's ``intermediate_size``,
    ``num_attention_heads``, ``vocab_size``: a random model of that shape costs what the real
    one costs; ids past the small tokenizer's are simply never used); ``dtype`` is the dtype
    the weights are saved in (default float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_decoder_tokenizer(out, max_position_embeddings)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,  # as for the tiny BERTs: clearly different scores for different inputs
    )
    common.update(config)
    torch.manual_seed(seed)
    if architecture == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**{"head_dim": hidden_size // common["num_attention_heads"], **common}))
    elif architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"architecture must be qwen3 or llama, got {architecture!r}")
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- Ray index builds


class CrashOnceEncodeBatch:
    """An encoder actor for :func:`serve_app.index.ray_build.build_index_ray` whose process dies
    (``os._exit``) in the middle of its first batch of the whole build, then works as the real one.

    ``SERVE_APP_TEST_CRASH_MARKER`` names a file: the first actor to find it absent creates it
    and dies; Ray restarts the actor and retries the batch. Tests read the marker to know the
    crash happened.
    """

    def __init__(self, dense: Any, chunking: Any, threads: int) -> None:
        from serve_app.index.ray_build import EncodeBatch

        self._inner = EncodeBatch(dense, chunking, threads)

    def __call__(self, batch: Any) -> Any:
        import os

        marker = os.environ.get("SERVE_APP_TEST_CRASH_MARKER")
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(17)
        return self._inner(batch)


class AlwaysFailingEncodeBatch:
    """An encoder actor whose every batch raises: a build that cannot succeed."""

    def __init__(self, dense: Any, chunking: Any, threads: int) -> None:
        pass

    def __call__(self, batch: Any) -> Any:
        raise RuntimeError("this encoder always fails (test)")


def asgi_request(app: Any, method: str, path: str, *, raise_app_exceptions: bool = False, base_url: str = "http://test", **kwargs: Any) -> Any:
    """One request to an ASGI app in process (no server, no Ray), as ``httpx.Response``."""
    import asyncio

    import httpx

    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions), base_url=base_url) as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def rankings_agree(a: Sequence[Any], b: Sequence[Any], *, tol: float = 0.0) -> bool:
    """Whether two ranked lists of hits (``doc_id``, ``score``; best first, cut at the same k)
    are the same ranking up to the order of equal scores: the scores agree position by position
    (within ``tol``), and the documents of each run of equal scores are the same set, except the
    run the cut falls in, where either list may hold any of the tied documents.

    >>> from serve_app.types import Hit
    >>> rankings_agree([Hit("a", 2.0), Hit("b", 1.0), Hit("c", 1.0)], [Hit("a", 2.0), Hit("c", 1.0), Hit("b", 1.0)])
    True
    >>> rankings_agree([Hit("a", 2.0), Hit("b", 1.0)], [Hit("b", 2.0), Hit("a", 1.0)])
    False
    """
    if len(a) != len(b):
        return False
    if any(abs(x.score - y.score) > tol for x, y in zip(a, b)):
        return False
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and abs(a[j + 1].score - a[i].score) <= tol:
            j += 1
        if j + 1 < len(a) and {h.doc_id for h in a[i : j + 1]} != {h.doc_id for h in b[i : j + 1]}:
            return False
        i = j + 1
    return True
