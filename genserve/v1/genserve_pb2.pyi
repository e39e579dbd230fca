from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_TEXT_TO_IMAGE: _ClassVar[Task]
    TASK_TEXT_TO_VIDEO: _ClassVar[Task]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_GIF: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_RAW: _ClassVar[OutputFormat]
TASK_UNSPECIFIED: Task
TASK_TEXT_TO_IMAGE: Task
TASK_TEXT_TO_VIDEO: Task
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_GIF: OutputFormat
OUTPUT_FORMAT_RAW: OutputFormat

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "task", "prompt", "negative_prompt", "width", "height", "num_frames", "fps", "num_inference_steps", "guidance_scale", "seed", "slo_ms", "output_format")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    task: Task
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    slo_ms: int
    output_format: OutputFormat
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., slo_ms: _Optional[int] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height", "num_frames", "fps", "format")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    num_frames: int
    fps: int
    format: OutputFormat
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "media", "model", "task", "queue_ms", "latency_ms", "slo_ms", "slo_met", "num_preemptions", "sp_degrees", "seed", "num_inference_steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_MET_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    SP_DEGREES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    media: Media
    model: str
    task: Task
    queue_ms: float
    latency_ms: float
    slo_ms: int
    slo_met: bool
    num_preemptions: int
    sp_degrees: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    num_inference_steps: int
    def __init__(self, request_id: _Optional[str] = ..., media: _Optional[_Union[Media, _Mapping]] = ..., model: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., queue_ms: _Optional[float] = ..., latency_ms: _Optional[float] = ..., slo_ms: _Optional[int] = ..., slo_met: _Optional[bool] = ..., num_preemptions: _Optional[int] = ..., sp_degrees: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "type", "elapsed_s", "queue_position", "step", "num_steps", "eta_s", "sp_degree", "response", "reason", "status_code")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[GenerateEvent.Type]
        QUEUED: _ClassVar[GenerateEvent.Type]
        STARTED: _ClassVar[GenerateEvent.Type]
        STEP: _ClassVar[GenerateEvent.Type]
        PREEMPTED: _ClassVar[GenerateEvent.Type]
        RESUMED: _ClassVar[GenerateEvent.Type]
        RESHARDED: _ClassVar[GenerateEvent.Type]
        COMPLETED: _ClassVar[GenerateEvent.Type]
        FAILED: _ClassVar[GenerateEvent.Type]
        CANCELLED: _ClassVar[GenerateEvent.Type]
    TYPE_UNSPECIFIED: GenerateEvent.Type
    QUEUED: GenerateEvent.Type
    STARTED: GenerateEvent.Type
    STEP: GenerateEvent.Type
    PREEMPTED: GenerateEvent.Type
    RESUMED: GenerateEvent.Type
    RESHARDED: GenerateEvent.Type
    COMPLETED: GenerateEvent.Type
    FAILED: GenerateEvent.Type
    CANCELLED: GenerateEvent.Type
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    SP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    type: GenerateEvent.Type
    elapsed_s: float
    queue_position: int
    step: int
    num_steps: int
    eta_s: float
    sp_degree: int
    response: GenerateResponse
    reason: str
    status_code: str
    def __init__(self, request_id: _Optional[str] = ..., type: _Optional[_Union[GenerateEvent.Type, str]] = ..., elapsed_s: _Optional[float] = ..., queue_position: _Optional[int] = ..., step: _Optional[int] = ..., num_steps: _Optional[int] = ..., eta_s: _Optional[float] = ..., sp_degree: _Optional[int] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., reason: _Optional[str] = ..., status_code: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "task", "is_default", "default_width", "default_height", "max_width", "max_height", "default_num_frames", "max_num_frames", "default_steps", "max_steps", "size_multiple", "default_guidance_scale", "default_fps", "output_formats", "max_sp_degree")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_SP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: Task
    is_default: bool
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    default_num_frames: int
    max_num_frames: int
    default_steps: int
    max_steps: int
    size_multiple: int
    default_guidance_scale: float
    default_fps: int
    output_formats: _containers.RepeatedScalarFieldContainer[OutputFormat]
    max_sp_degree: int
    def __init__(self, name: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., is_default: _Optional[bool] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., max_width: _Optional[int] = ..., max_height: _Optional[int] = ..., default_num_frames: _Optional[int] = ..., max_num_frames: _Optional[int] = ..., default_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., size_multiple: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., default_fps: _Optional[int] = ..., output_formats: _Optional[_Iterable[_Union[OutputFormat, str]]] = ..., max_sp_degree: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
