"""Validated settings of the two training jobs (``train-reranker`` and ``distill``).

``LoopConfig`` holds what every job shares (optimisation, schedule, checkpoints, early
stopping); ``MiningConfig`` says how training examples are drawn from a BEIR dataset;
``RerankerTrainingConfig`` and ``DistillConfig`` add the job-specific fields. The CLI flags
are named after these fields (``--hard-negative-depth`` sets ``hard_negative_depth``), and
every model round-trips through JSON (``model_dump``), which is how the settings travel to
Ray Train workers and into the output directory.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoopConfig(_Strict):
    """Optimisation, schedule, checkpointing and early stopping (shared by both jobs)."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training examples.")
    batch_size: int = Field(8, ge=1, le=4096, description="Training examples per optimiser step (a reranker example is one query with its positive and its negatives; a distillation example is one triple).")
    lr: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay (not applied to biases and LayerNorm weights).")
    warmup: float = Field(0.1, ge=0, le=1.0, description="Fraction of the optimiser steps spent in linear warm-up; the rate then decays linearly to 0.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm).")
    max_length: int = Field(256, ge=16, le=8192, description="Tokens per encoded text (cross-encoder: per query+document pair; bi-encoder: per text).")
    seed: int = Field(42, ge=0, description="Seeds torch, numpy and random, the dev split, negative sampling and the example order.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the dev queries every N optimiser steps; 0 evaluates at the end of each epoch only.")
    patience: int = Field(0, ge=0, description="Stop after this many evaluations without improvement of the dev metric; 0 never stops early.")
    eval_at_start: bool = Field(False, description="Also evaluate the starting model (step 0): reports the baseline, and the starting weights are kept if training never beats them.")
    dev_metric: Literal["nDCG@10", "RR@10"] = Field("nDCG@10", description="Dev metric (ir-measures name) used to keep the best model and to stop early.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N optimiser steps (checkpoints are also saved at each evaluation); 0 = at evaluations only.")
    keep_checkpoints: int = Field(1, ge=1, le=100, description="Most recent checkpoints kept on disk.")
    stop_after_steps: Optional[int] = Field(None, ge=1, description="Checkpoint and stop after this many optimiser steps without changing the schedule (a time-boxed run, continued later with --resume).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on CUDA with bf16 support, fp16 autocast (with a gradient scaler) on other CUDA devices, fp32 on CPU.")
    device: Optional[str] = Field(None, description="torch device for a local run (cpu, cuda, cuda:1); null picks CUDA when available. Ray workers use the device Ray assigns.")
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (torch.set_num_threads); null keeps torch's default.")
    show_progress: bool = Field(True, description="Progress with the running loss: a bar on a terminal, a line every SERVE_APP_PROGRESS_INTERVAL_S seconds (30) elsewhere.")


class MiningConfig(_Strict):
    """Which queries are used and how negatives are found for them."""

    split: str = Field("train", min_length=1, description="qrels split the training examples come from (qrels/<split>.tsv).")
    dev_fraction: float = Field(0.1, ge=0, lt=1.0, description="Fraction of the split's queries held out as the dev set (early stopping, best model).")
    max_queries: Optional[int] = Field(None, ge=1, description="Use at most this many queries of the split (seeded random subsample, taken before the dev split).")
    title_queries: int = Field(0, ge=0, description="Add up to this many synthetic training queries: the titles of randomly chosen documents, each with its own document as the one positive (weak supervision when few queries are judged; never used for dev).")
    hard_negatives_from: Literal["bm25", "dense", "both", "none"] = Field("bm25", description="Retriever(s) whose top documents, judged positives excluded, are the hard negatives.")
    hard_negative_depth: int = Field(30, ge=1, le=1000, description="Hard negatives are drawn from each retriever's top-K documents.")
    hard_negative_skip: int = Field(0, ge=0, le=1000, description="Leave out the top-N retrieved non-positive documents (often unjudged relevant documents).")
    random_negatives: int = Field(1, ge=0, le=1000, description="Of the negatives of each example, this many are random corpus documents (never a judged positive); the rest are hard negatives, topped up with random ones when a query has too few.")
    index: Optional[str] = Field(None, description="Mine hard negatives with the retrievers of this index directory (serve-app index over the same corpus) instead of building them: saves encoding the corpus for dense mining.")
    dev_candidates: int = Field(30, ge=1, le=1000, description="Dev metric: each dev query's positives are ranked together with at most this many of its hard negatives (random ones without hard).")
    dense_model: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="Bi-encoder used to mine dense hard negatives.")
    dense_max_length: int = Field(256, ge=8, le=8192, description="Tokens per text when encoding the corpus for dense mining.")


class RerankerTrainingConfig(_Strict):
    """``serve-app train-reranker``: fine-tune a cross-encoder on relevance labels."""

    dataset: str = Field(..., description="BEIR dataset directory (corpus, queries, qrels/<split>.tsv).")
    base: str = Field(..., description="Starting checkpoint: an encoder or a cross-encoder (Hub id or local directory); a plain encoder gets a new 1-logit head.")
    out: str = Field(..., description="Output model directory (a standard Hugging Face sequence-classification checkpoint).")
    loss: Literal["bce", "listwise"] = Field("listwise", description="bce: binary cross-entropy on every (query, document) pair; listwise: softmax cross-entropy over the positive and its negatives.")
    head_lr_scale: float = Field(1.0, ge=1.0, le=1000.0, description="Learning-rate multiplier for the parameters the base checkpoint lacks (the new 1-logit head of a plain encoder), which start from random values.")
    negatives_per_query: int = Field(7, ge=1, le=1000, description="Negatives per training example; --random-negatives of them are random documents, the others hard negatives.")
    mining: MiningConfig = Field(default_factory=MiningConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)


class DistillConfig(_Strict):
    """``serve-app distill``: teach a bi-encoder the cross-encoder's score margins (Margin-MSE)."""

    dataset: str = Field(..., description="BEIR dataset directory.")
    teacher: str = Field(..., description="Cross-encoder directory (1- or 2-label sequence classifier) that scores the triples.")
    student: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="Bi-encoder to train (Hub id or local directory; mean pooling + L2 normalisation).")
    out: str = Field(..., description="Output bi-encoder directory (transformers checkpoint + sentence-transformers module files).")
    triples_per_positive: int = Field(4, ge=1, le=1000, description="(query, positive, negative) triples built per judged positive.")
    student_scale: Optional[float] = Field(None, gt=0, le=1000, description="Fixed factor on the student's cosine similarity before margins are compared with the teacher's logits; null fits it once, before training, by least squares on the initial margins (clipped to [1, 100]).")
    teacher_max_length: int = Field(512, ge=16, le=8192, description="Tokens per pair when the teacher scores triples.")
    teacher_batch_tokens: int = Field(16384, ge=64, description="Token budget per teacher forward pass.")
    mining: MiningConfig = Field(default_factory=MiningConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @model_validator(mode="after")
    def _needs_negatives(self) -> "DistillConfig":
        if self.mining.hard_negatives_from == "none" and self.mining.random_negatives == 0:
            raise ValueError("distillation needs negatives: set hard_negatives_from or random_negatives")
        return self


class DistillRerankerConfig(_Strict):
    """``serve-app distill-reranker``: a small cross-encoder trained on a large one's scores (the first stage of a cascade)."""

    dataset: str = Field(..., description="BEIR dataset directory (corpus and queries; qrels/<split>.tsv picks the training queries and their positives).")
    teacher: str = Field(..., description="The large reranker (any family serve_app serves) whose scores are the labels.")
    out: str = Field(..., description="Output cross-encoder directory (a standard Hugging Face sequence-classification checkpoint).")
    student: Optional[str] = Field(None, description="Starting checkpoint of the student (Hub id or local directory); null: the teacher's first student_layers layers (a cross-encoder teacher only).")
    student_layers: int = Field(2, ge=1, le=48, description="Transformer layers kept from the teacher when student is null.")
    candidates_per_query: int = Field(16, ge=2, le=1000, description="Candidates per training query (positives, then the retrievers' top documents, then random ones), all scored by the teacher.")
    loss: Literal["listwise_kl", "margin_mse"] = Field("listwise_kl", description="listwise_kl: KL divergence between the teacher's and the student's softmax over a query's candidates. margin_mse: MSE between their score margins to the teacher's best candidate.")
    temperature: float = Field(1.0, gt=0, le=100, description="listwise_kl: softmax temperature of both score lists.")
    head_lr_scale: float = Field(1.0, ge=1.0, le=1000.0, description="Learning-rate multiplier of parameters the student checkpoint lacks (a new head).")
    teacher_max_length: int = Field(512, ge=16, le=8192, description="Tokens per pair when the teacher scores.")
    teacher_batch_tokens: int = Field(16384, ge=64, description="Token budget per teacher forward pass.")
    mining: MiningConfig = Field(default_factory=MiningConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
