"""The demo's configuration: which models, which rewards, and the limits that protect the server."""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class DemoConfig:
    """Everything `build_app` needs. The CLI (`diffalign demo`, `demos/app.py`) fills it from flags.

    Model sources (`base`):
      - "toy" / "toy:sdxl" / "toy:sd3": the toy-world checkpoint in `diffalign/toyworld/checkpoints/`;
        when it is absent the app falls back to "tiny:<family>" and says so on the page;
      - "tiny:sdxl" / "tiny:sd3": the offline, RANDOMLY initialised tiny pipelines of `diffalign.testing`;
      - any diffusers pipeline folder or Hub id (e.g. "stabilityai/stable-diffusion-xl-base-1.0").
    """

    base: str = "toy"
    lora: str | None = None  # the aligned model: a LoRA .safetensors file or a folder holding one
    user_adapter: str | None = None  # PPD output folder: user_attention + user_encoder_head safetensors
    # The user encoder's backbone, e.g. "clip:model_name='ViT-H-14',pretrained='laion2b_s32b_b79k'"
    # (None: `user_encoder.json` beside the adapter, else the tiny random open_clip).
    user_encoder: str | None = None
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "float32"
    # Reward models shown under each image: registry names with optional ":key=value,..." kwargs.
    # None = the default that builds offline (see scoring.default_reward_specs); [] = no rewards.
    rewards: list[str] | None = None
    # GenEval-style verdicts under each image (toy detector; only for toy-world prompts).
    geneval: bool = True

    # Folders a client may name (besides `lora`, `results_dirs` and gradio's upload folder): every path typed
    # into the page is confined to these (see demo/paths.py).
    lora_dirs: list[str] = field(default_factory=list)
    results_roots: list[str] = field(default_factory=list)
    max_loras: int = 4  # LoRAs kept loaded at once (least recently used unloaded first; `lora` stays)

    # Server.
    host: str = "127.0.0.1"
    auth: list[tuple[str, str]] | None = None  # (user, password) pairs; required for a non-local host
    insecure_public: bool = False  # serve a non-local host without auth anyway
    cache_max_age_s: int = 3600  # gradio's upload/output cache: files older than this are deleted, checked as often
    port: int = 7860
    concurrency_limit: int = 1  # generation requests run at once (they share one pipeline)
    max_queue_size: int = 64
    max_upload_mb: float = 10.0
    max_upload_pixels: int = 2048 * 2048

    # Generation limits and defaults (None = the model's own: 64 px for tiny/toy models, else its native size).
    max_steps: int = 50
    min_size: int = 32
    max_size: int = 1024
    default_steps: int | None = None
    default_size: int | None = None
    default_guidance: float = 5.0
    max_guidance: float = 20.0
    max_prompt_chars: int = 400

    # Personalize tab.
    num_pairs: int = 4

    # Benchmark tab: GenEval results folders shown on load (each holds results.jsonl).
    results_dirs: list[str] = field(default_factory=list)
    max_failures_shown: int = 48

    def __post_init__(self):
        if self.concurrency_limit < 1:
            raise ValueError(f"concurrency_limit must be >= 1, got {self.concurrency_limit}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not (8 <= self.min_size <= self.max_size):
            raise ValueError(f"need 8 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        if self.max_upload_mb <= 0 or self.max_upload_pixels <= 0:
            raise ValueError("max_upload_mb and max_upload_pixels must be positive")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.cache_max_age_s < 1:
            raise ValueError(f"cache_max_age_s must be >= 1, got {self.cache_max_age_s}")
        if not self.is_local and not self.auth and not self.insecure_public:
            raise ValueError(
                f"serving on {self.host} lets other machines in with no login; pass --auth USER:PASSWORD "
                "(or --auth_file FILE), or --insecure_public to serve without one"
            )
        if not (1 <= self.port <= 65535):
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
