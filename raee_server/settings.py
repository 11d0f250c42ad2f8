"""All configuration in one typed object, read from flags and `RAEE_*` environment variables."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BACKBONE = "gguf:gemma3-270m-q4-k-m"
DEFAULT_ENCODER = "minilm"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "raee"


class Settings(BaseSettings):
    """Service settings; every field can be set as `RAEE_<FIELD>` (e.g. `RAEE_DATA_DIR`)."""

    model_config = SettingsConfigDict(env_prefix="RAEE_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="stores (vectors, SQLite)")
    model_cache: Path | None = Field(
        default=None, description="converted weights; default <data_dir>/models"
    )
    backbone: str = Field(
        default=DEFAULT_BACKBONE,
        description="'gguf:gemma3-270m-q4-k-m' (packaged), a local directory, a cached model id or a .gguf path",
    )
    encoder: str = Field(
        default=DEFAULT_ENCODER, description="'minilm' (packaged) or a local sentence-transformers dir"
    )
    key_runtime: Literal["onnx", "torch"] = Field(
        default="onnx", description="what runs a sentence-transformers key encoder on the CPU: onnx (ONNX "
        "Runtime, exported once into the model cache; the same keys within 1e-6, faster) or torch")
    device: str = Field(default="cpu", description="torch device of the backbone and encoder: cpu, cuda, cuda:1")
    dtype: str = Field(default="float32", description="float32, bfloat16 or float16 (other than float32: its "
                       "own backbone id, so its records never mix with float32's)")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    qdrant_url: str | None = Field(
        default=None, description="Qdrant server (e.g. http://qdrant:6333, used over gRPC) or ':memory:'; default Edge"
    )
    qdrant_api_key: str | None = Field(default=None, description="API key of the Qdrant server")
    qdrant_timeout: int = Field(default=5, description="seconds before a Qdrant call counts as unreachable")
    qdrant_shard_per_task: bool = Field(default=False, description="custom sharding: one shard key per task")
    qdrant_replication_factor: int | None = Field(default=None, description="copies of each shard (cluster)")
    qdrant_shard_number: int | None = Field(default=None, description="shards per collection (cluster)")
    default_k: int = Field(default=12, description="neighbours retrieved when a request gives no k")
    max_k: int = Field(default=64, description="the largest k a request may ask for (INVALID_ARGUMENT past it)")
    max_text_chars: int = Field(default=8192, description="characters per text (INVALID_ARGUMENT past it, "
                                "unless the request asks to truncate)")
    max_tokens: int = Field(default=512, description="prompt tokens per text given to the backbone")
    ingest_batch_size: int = Field(default=128, description="rows a local ingest reads, computes and stores "
                                   "together (the backbone runs them forward_batch_size at a time)")
    ingest_sort_by_length: bool = Field(default=True, description="batch the rows of an ingest by token count "
                                        "(less padding; the same records)")
    ingest_chunk_rows: int = Field(
        default=4, description="rows of an online Ingest computed per worker turn (a Classify waits at most one turn)")
    forward_batch_size: int = Field(default=16, description="rows per backbone batch of an evaluation")
    retune_growth: float = Field(default=0.5, description="auto re-tunes when the database grew by this fraction")
    heads_refit_rows: int = Field(default=1000, ge=1, description="exit heads refit (warm, from the served "
                                  "version) once this many records were added since it, or at retune_growth")
    fit_niceness: int = Field(default=19, ge=0, le=19, description="CPU niceness of the server's background "
                              "exit-head fit (19: it gets only what requests leave)")
    retune_check_seconds: float = Field(default=30.0, description="how often the server checks whether a task "
                                        "needs new exit heads or a new auto choice (and loads newer heads)")
    replica_id: str = Field(default="", description="this server's name among replicas over one database "
                            "(its leases, logs and console show it); empty: host:pid:random")
    lease_seconds: float = Field(default=60.0, gt=0, description="a replica's lease on a task's fit or tune "
                                 "lasts this long unless renewed; another replica takes the work over after it")
    index_on_start: bool = Field(
        default=True, description="embedded store: build pending indexes while the server loads, before SERVING"
    )
    threads: int | None = Field(default=None, description="torch intra-op threads; default torch's choice")

    # gRPC service (used by raee-server)
    address: str = Field(default="127.0.0.1:50051", description="gRPC address (host:port, or unix:PATH)")
    http_address: str = Field(
        default="127.0.0.1:8080",
        description="HTTP/JSON API and web console (host:port, port 0: any free one); empty: off")
    metrics_port: int = Field(default=9464, description="Prometheus /metrics port; -1: none, 0: any free port")
    metrics_address: str = Field(
        default="127.0.0.1",
        description="address /metrics binds; 0.0.0.0 to let a scraper in another container or host reach it")
    max_batch_size: int = Field(default=16, description="texts per model batch (a larger request is cut into chunks)")
    max_batch_texts: int = Field(
        default=1024, description="texts one ClassifyBatch may carry (INVALID_ARGUMENT past it)"
    )
    max_wait_ms: float = Field(default=5.0, description="how long the first request of a dynamic batch waits "
                               "for others")
    queue_size: int = Field(default=256, description="requests waiting for the model worker before "
                            "RESOURCE_EXHAUSTED")
    grace_seconds: float = Field(default=10.0, description="on SIGTERM: time for calls in flight to finish")
    max_message_bytes: int = Field(default=4 * 1024 * 1024, description="bytes per gRPC message and per HTTP "
                                   "body or NDJSON line")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one JSON object per line, with an access line per RPC")
    retry_seconds: float = Field(default=5.0, description="wait between attempts to reach an unreachable store")
    health_interval_seconds: float = Field(default=5.0, description="how often health probes the vector store")

    # Access control (off by default; see docs/security.md)
    api_keys_file: Path | None = Field(default=None, description="TOML of hashed API keys; unset: no keys needed")
    allow_unauthenticated: bool = Field(
        default=False,
        description="serve without API keys on a non-loopback address (refused otherwise; logged as a warning)",
    )
    tls_cert: Path | None = Field(default=None, description="server certificate (PEM); unset: plaintext")
    tls_key: Path | None = Field(default=None, description="the server certificate's private key (PEM)")
    tls_client_ca: Path | None = Field(default=None, description="CA for client certificates: mutual TLS")

    @property
    def models_dir(self) -> Path:
        return self.model_cache or self.data_dir / "models"

    @property
    def sql_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'metadata.sqlite'}"
