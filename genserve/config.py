"""Server configuration: frozen dataclasses, validated without I/O."""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from genserve.logs import FORMATS

if TYPE_CHECKING:
    from genserve.models.base import ModelLimits

DEFAULT_MODELS = ("sd3-tiny", "wan-tiny")


# Limits' caps and the request field each one bounds.
CAPPED_FIELDS = {"max_width": "width", "max_height": "height", "max_frames": "num_frames",
                 "max_steps": "num_inference_steps"}


@dataclass(frozen=True, slots=True)
class Limits:
    """Edge limits applied before a request reaches the engine (on top of each
    model's own maxima)."""

    max_prompt_chars: int = 4096
    max_message_bytes: int = 1 << 20  # inbound gRPC message size
    max_queue: int = 4096  # waiting requests; beyond it RESOURCE_EXHAUSTED
    # Caps below the models' own maxima (None: the model's maximum applies).
    max_width: int | None = None
    max_height: int | None = None
    max_frames: int | None = None
    max_steps: int | None = None

    def validate(self) -> None:  # (messages name the serve flags, as users set them there)
        for name in ("max_prompt_chars", "max_message_bytes", "max_queue"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in CAPPED_FIELDS:
            cap = getattr(self, name)
            if cap is not None and cap < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {cap} "
                                 "(leave it out for the models' own maximum)")

    def effective(self, model: str, own: ModelLimits) -> ModelLimits:
        """The limits ``model`` is served with: its own, each maximum lowered
        to the cap (onto a value the model takes) and each default clamped to
        its maximum. Computed once at start-up, they are what ListModels
        publishes and what requests are held to, so a request that leaves a
        field unset gets a value the server accepts. ValueError, naming the
        model and the flag, when a cap leaves the model no valid value."""
        max_width = self._capped(model, "max_width", own.max_width, own.size_multiple, own.size_multiple)
        max_height = self._capped(model, "max_height", own.max_height, own.size_multiple, own.size_multiple)
        max_frames = self._capped(model, "max_frames", own.max_frames, 1, own.frame_multiple)
        max_steps = self._capped(model, "max_steps", own.max_steps, 1, 1)
        return replace(own, max_width=max_width, max_height=max_height, max_frames=max_frames,
                       max_steps=max_steps, default_width=min(own.default_width, max_width),
                       default_height=min(own.default_height, max_height),
                       default_frames=min(own.default_frames, max_frames),
                       default_steps=min(own.default_steps, max_steps))

    def _capped(self, model: str, name: str, own_max: int, first: int, step: int) -> int:
        """The model's maximum ``own_max`` lowered to this cap, then down to
        the largest value the model takes (``first + k * step``): the maximum
        published is one a request can actually use."""
        cap = getattr(self, name)
        if cap is None or cap >= own_max:
            return own_max
        if cap < first:
            flag, what = "--" + name.replace("_", "-"), CAPPED_FIELDS[name]
            raise ValueError(f"{flag} {cap} leaves model {model!r} no valid {what} "
                             f"(the smallest it takes is {first})")
        return first + (cap - first) // step * step


@dataclass(frozen=True, slots=True)
class EngineConfig:
    policy: str = "genserve"
    profile: str = ""  # latency profile name or path; empty: measured at start-up
    default_slo_scale: float = 3.0  # slo_ms=0 → scale × predicted isolated latency
    admission_control: bool = False
    max_image_batch: int = 8
    chunk_ms: float = 0.0  # step-level policies: dispatch up to this much work per decision (0: one step)
    # A dispatch this long past its predicted end (and OVERDUE_FACTOR x its
    # prediction) has a hung worker: the workers it waits for are killed and
    # restarted, as after a crash (0: never; the engine only warns). Long
    # enough for a first step that compiles or warms up, or a slow CPU step.
    hung_worker_s: float = 300.0

    def validate(self) -> None:
        from genserve.scheduler import POLICY_NAMES  # torch-free

        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICY_NAMES)}")
        if not 0 < self.default_slo_scale < math.inf:  # (NaN fails too)
            raise ValueError(f"--default-slo-scale must be a positive number, not {self.default_slo_scale}")
        if self.max_image_batch < 1:
            raise ValueError("max_image_batch must be at least 1")
        if not 0 <= self.chunk_ms < math.inf:
            raise ValueError(f"--chunk-ms must be a number >= 0, not {self.chunk_ms}")
        if not 0 <= self.hung_worker_s < math.inf:
            raise ValueError(f"--hung-worker-s must be a number >= 0, not {self.hung_worker_s}")


@dataclass(frozen=True, slots=True)
class Security:
    """TLS, token auth and per-client limits at the gRPC edge. Paths only:
    ``genserve.security.load_security`` reads the files."""

    tls_cert: str = ""  # PEM certificate chain; with tls_key: serve TLS
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle; set: require and verify client certificates (mTLS)
    auth_tokens: str = ""  # file of "TOKEN TENANT" lines; set: every call but health/reflection needs a token
    max_streams_per_client: int = 64  # in-flight Generate/GenerateStream per client; 0: no limit

    def validate(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.max_streams_per_client < 0:
            raise ValueError("--max-streams-per-client must be >= 0 (0: no limit)")


def check_attention(attention: str, device: str) -> None:
    """Raise unless attention backend ``attention`` can run on ``device`` (cpu|cuda)."""
    if attention not in ("sdpa", "xformers"):
        raise ValueError(f"attention must be sdpa or xformers, not {attention!r}")
    if attention == "xformers" and device != "cuda":
        raise ValueError("the xformers attention backend needs --device cuda (it has no CPU kernels)")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0: no metrics endpoint
    device: str = "cpu"  # cpu | cuda
    num_workers: int = 2  # CPU workers; with cuda, 0 = every visible GPU
    threads_per_worker: int = 0  # 0: cores / workers
    models: tuple[str, ...] = DEFAULT_MODELS  # preset names or NAME=PATH
    dtype: str = "float32"
    attention: str = "sdpa"  # attention kernel: sdpa (PyTorch) | xformers (CUDA, optional extra)
    in_process: bool = False  # workers as threads (tests, debugging)
    max_sp_degree: int = 8  # largest sequence-parallel group (1: no process groups)
    paused_budget_mb: float = 0.0  # device memory per worker for paused states (0: unlimited)
    grace_s: float = 30.0  # on SIGTERM, how long accepted requests get to finish
    log_format: str = "text"  # the workers' log lines: text | json (genserve.logs)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)

    def validate(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("--port and --metrics-port must be in 0..65535")
        if self.port and self.port == self.metrics_port:
            raise ValueError(f"--port and --metrics-port are both {self.port}; give /metrics a port of its own")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        if self.log_format not in FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, not {self.log_format!r}")
        if self.device == "cpu" and self.num_workers < 1:
            raise ValueError("--num-workers must be at least 1 on cpu")
        if not self.models:
            raise ValueError("at least one model is needed")
        self._check_names()
        if self.max_sp_degree not in (1, 2, 4, 8):
            raise ValueError("--max-sp-degree must be 1, 2, 4 or 8")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        for name in ("num_workers", "threads_per_worker", "paused_budget_mb", "grace_s"):
            if not getattr(self, name) >= 0:  # also NaN
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        check_attention(self.attention, self.device)
        self.engine.validate()
        self.limits.validate()
        self._check_caps()
        self.security.validate()

    def _check_names(self) -> None:
        """Each model needs its own name: a worker keeps one model per name,
        so a second ``--model`` of the same name would replace the first
        after both had loaded."""
        from genserve.models.checkpoint import parse_spec  # torch-free

        seen: dict[str, str] = {}
        for spec in self.models:
            name = parse_spec(spec)[0]
            if name in seen:
                raise ValueError(f"two models are named {name!r} (--model {seen[name]} and --model {spec}); "
                                 "give each its own name")
            seen[name] = spec

    def _check_caps(self) -> None:
        """Caps that leave a built-in preset no valid value are refused here,
        before any worker loads it; checkpoints are checked once loaded (their
        limits come with them)."""
        from genserve.models.preset_limits import PRESET_LIMITS  # torch-free

        for name in self.models:
            if name in PRESET_LIMITS:
                self.limits.effective(name, PRESET_LIMITS[name])
