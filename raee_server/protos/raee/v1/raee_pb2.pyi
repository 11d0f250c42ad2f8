from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operation(_message.Message):
    __slots__ = ("name", "kind", "task", "state", "done", "progress_done", "progress_total", "progress_message", "create_time", "start_time", "end_time", "error", "response")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Operation.State]
        STATE_QUEUED: _ClassVar[Operation.State]
        STATE_RUNNING: _ClassVar[Operation.State]
        STATE_SUCCEEDED: _ClassVar[Operation.State]
        STATE_FAILED: _ClassVar[Operation.State]
        STATE_CANCELLED: _ClassVar[Operation.State]
    STATE_UNSPECIFIED: Operation.State
    STATE_QUEUED: Operation.State
    STATE_RUNNING: Operation.State
    STATE_SUCCEEDED: Operation.State
    STATE_FAILED: Operation.State
    STATE_CANCELLED: Operation.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    task: str
    state: Operation.State
    done: bool
    progress_done: int
    progress_total: int
    progress_message: str
    create_time: str
    start_time: str
    end_time: str
    error: _status_pb2.Status
    response: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., task: _Optional[str] = ..., state: _Optional[_Union[Operation.State, str]] = ..., done: _Optional[bool] = ..., progress_done: _Optional[int] = ..., progress_total: _Optional[int] = ..., progress_message: _Optional[str] = ..., create_time: _Optional[str] = ..., start_time: _Optional[str] = ..., end_time: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., response: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class FitHeadsRequest(_message.Message):
    __slots__ = ("task", "full")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    task: str
    full: bool
    def __init__(self, task: _Optional[str] = ..., full: _Optional[bool] = ...) -> None: ...

class FitHeadsResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class TuneRequest(_message.Message):
    __slots__ = ("task", "validation", "all_candidates")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    ALL_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    task: str
    validation: int
    all_candidates: bool
    def __init__(self, task: _Optional[str] = ..., validation: _Optional[int] = ..., all_candidates: _Optional[bool] = ...) -> None: ...

class TuneResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("task", "examples", "policies", "k")
    TASK_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    task: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    policies: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, task: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., policies: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class BackfillFeaturesRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class BackfillFeaturesResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class CheckRecordsRequest(_message.Message):
    __slots__ = ("task", "repair")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    task: str
    repair: bool
    def __init__(self, task: _Optional[str] = ..., repair: _Optional[bool] = ...) -> None: ...

class CheckRecordsResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class BuildIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BuildIndexResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class ClassifyOptions(_message.Message):
    __slots__ = ("k", "policy", "return_neighbours", "truncate")
    K_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RETURN_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    k: int
    policy: str
    return_neighbours: bool
    truncate: bool
    def __init__(self, k: _Optional[int] = ..., policy: _Optional[str] = ..., return_neighbours: _Optional[bool] = ..., truncate: _Optional[bool] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("task", "text", "options", "request_id", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    text: str
    options: ClassifyOptions
    request_id: str
    inputs: _containers.ScalarMap[str, str]
    def __init__(self, task: _Optional[str] = ..., text: _Optional[str] = ..., options: _Optional[_Union[ClassifyOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Inputs(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("id", "similarity", "label", "exit_layers", "exit_probabilities")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXIT_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    id: str
    similarity: float
    label: str
    exit_layers: _containers.RepeatedScalarFieldContainer[int]
    exit_probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., similarity: _Optional[float] = ..., label: _Optional[str] = ..., exit_layers: _Optional[_Iterable[int]] = ..., exit_probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_us", "encode_us", "retrieve_us", "forward_us", "total_us")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_US_FIELD_NUMBER: _ClassVar[int]
    FORWARD_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    encode_us: int
    retrieve_us: int
    forward_us: int
    total_us: int
    def __init__(self, queue_us: _Optional[int] = ..., encode_us: _Optional[int] = ..., retrieve_us: _Optional[int] = ..., forward_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("label", "scores", "exit_layer", "depth", "neighbours", "timings", "request_id", "policy", "answered_by", "coverage")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    label: str
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    exit_layer: int
    depth: int
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    timings: Timings
    request_id: str
    policy: str
    answered_by: str
    coverage: str
    def __init__(self, label: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., exit_layer: _Optional[int] = ..., depth: _Optional[int] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., policy: _Optional[str] = ..., answered_by: _Optional[str] = ..., coverage: _Optional[str] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("task", "text", "options", "request_id", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    text: str
    options: ClassifyOptions
    request_id: str
    inputs: _containers.ScalarMap[str, str]
    def __init__(self, task: _Optional[str] = ..., text: _Optional[str] = ..., options: _Optional[_Union[ClassifyOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("index", "request_id", "result", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    request_id: str
    result: ClassifyResponse
    error: _status_pb2.Status
    def __init__(self, index: _Optional[int] = ..., request_id: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("task", "texts", "options", "inputs")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: ClassifyOptions
    inputs: _containers.RepeatedCompositeFieldContainer[Inputs]
    def __init__(self, task: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[ClassifyOptions, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Inputs, _Mapping]]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("text", "label", "inputs")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    text: str
    label: str
    inputs: _containers.ScalarMap[str, str]
    def __init__(self, text: _Optional[str] = ..., label: _Optional[str] = ..., inputs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("task", "examples")
    TASK_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    task: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, task: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("added", "already_present", "rejected", "rejections")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    added: int
    already_present: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, added: _Optional[int] = ..., already_present: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...

class DeleteRecordsRequest(_message.Message):
    __slots__ = ("task", "ids", "texts", "batch", "inputs")
    TASK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    texts: _containers.RepeatedScalarFieldContainer[str]
    batch: int
    inputs: _containers.RepeatedCompositeFieldContainer[Inputs]
    def __init__(self, task: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., texts: _Optional[_Iterable[str]] = ..., batch: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[Inputs, _Mapping]]] = ...) -> None: ...

class DeleteRecordsResponse(_message.Message):
    __slots__ = ("deleted_ids",)
    DELETED_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Relabel(_message.Message):
    __slots__ = ("id", "text", "label")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    label: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class RelabelRecordsRequest(_message.Message):
    __slots__ = ("task", "records")
    TASK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    task: str
    records: _containers.RepeatedCompositeFieldContainer[Relabel]
    def __init__(self, task: _Optional[str] = ..., records: _Optional[_Iterable[_Union[Relabel, _Mapping]]] = ...) -> None: ...

class RelabelRecordsResponse(_message.Message):
    __slots__ = ("relabelled", "rejections")
    RELABELLED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    relabelled: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, relabelled: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class CreateTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "backbone", "encoder", "depth", "device", "dtype", "policies", "default_k", "max_k", "max_text_chars", "max_batch_texts", "max_message_bytes", "api_keys_required", "replica")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    API_KEYS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    version: str
    backbone: str
    encoder: str
    depth: int
    device: str
    dtype: str
    policies: _containers.RepeatedScalarFieldContainer[str]
    default_k: int
    max_k: int
    max_text_chars: int
    max_batch_texts: int
    max_message_bytes: int
    api_keys_required: bool
    replica: str
    def __init__(self, version: _Optional[str] = ..., backbone: _Optional[str] = ..., encoder: _Optional[str] = ..., depth: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., policies: _Optional[_Iterable[str]] = ..., default_k: _Optional[int] = ..., max_k: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_batch_texts: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., api_keys_required: _Optional[bool] = ..., replica: _Optional[str] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "word", "share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    word: str
    share: float
    def __init__(self, name: _Optional[str] = ..., word: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "template", "labels", "description", "records", "depth", "earliest_exit_counts", "never_correct", "backbone", "encoder", "auto", "heads", "label_records", "imbalanced", "objective", "prior_correction", "adapt_prior", "traffic_prior", "traffic_prior_updated_at", "traffic_prior_answers", "inputs", "retrieval_key")
    class LabelRecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TrafficPriorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    EARLIEST_EXIT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    NEVER_CORRECT_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    LABEL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    IMBALANCED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    ADAPT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PRIOR_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PRIOR_UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PRIOR_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    template: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    description: str
    records: int
    depth: int
    earliest_exit_counts: _containers.RepeatedScalarFieldContainer[int]
    never_correct: int
    backbone: str
    encoder: str
    auto: AutoChoice
    heads: ExitHeadsInfo
    label_records: _containers.ScalarMap[str, int]
    imbalanced: bool
    objective: str
    prior_correction: bool
    adapt_prior: bool
    traffic_prior: _containers.ScalarMap[str, float]
    traffic_prior_updated_at: str
    traffic_prior_answers: int
    inputs: _containers.RepeatedScalarFieldContainer[str]
    retrieval_key: str
    def __init__(self, name: _Optional[str] = ..., template: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., description: _Optional[str] = ..., records: _Optional[int] = ..., depth: _Optional[int] = ..., earliest_exit_counts: _Optional[_Iterable[int]] = ..., never_correct: _Optional[int] = ..., backbone: _Optional[str] = ..., encoder: _Optional[str] = ..., auto: _Optional[_Union[AutoChoice, _Mapping]] = ..., heads: _Optional[_Union[ExitHeadsInfo, _Mapping]] = ..., label_records: _Optional[_Mapping[str, int]] = ..., imbalanced: _Optional[bool] = ..., objective: _Optional[str] = ..., prior_correction: _Optional[bool] = ..., adapt_prior: _Optional[bool] = ..., traffic_prior: _Optional[_Mapping[str, float]] = ..., traffic_prior_updated_at: _Optional[str] = ..., traffic_prior_answers: _Optional[int] = ..., inputs: _Optional[_Iterable[str]] = ..., retrieval_key: _Optional[str] = ...) -> None: ...

class ExitHeadsInfo(_message.Message):
    __slots__ = ("version", "fitted_at", "fit_seconds", "records", "validation_accuracy", "best_exit")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FITTED_AT_FIELD_NUMBER: _ClassVar[int]
    FIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BEST_EXIT_FIELD_NUMBER: _ClassVar[int]
    version: int
    fitted_at: str
    fit_seconds: float
    records: int
    validation_accuracy: _containers.RepeatedScalarFieldContainer[float]
    best_exit: int
    def __init__(self, version: _Optional[int] = ..., fitted_at: _Optional[str] = ..., fit_seconds: _Optional[float] = ..., records: _Optional[int] = ..., validation_accuracy: _Optional[_Iterable[float]] = ..., best_exit: _Optional[int] = ...) -> None: ...

class AutoChoice(_message.Message):
    __slots__ = ("policy", "k", "validation_accuracy", "validation_mean_exit", "validation_rows", "records", "chosen_at", "objective", "heads_version")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_MEAN_EXIT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ROWS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_AT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    HEADS_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    k: int
    validation_accuracy: float
    validation_mean_exit: float
    validation_rows: int
    records: int
    chosen_at: str
    objective: str
    heads_version: int
    def __init__(self, policy: _Optional[str] = ..., k: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., validation_mean_exit: _Optional[float] = ..., validation_rows: _Optional[int] = ..., records: _Optional[int] = ..., chosen_at: _Optional[str] = ..., objective: _Optional[str] = ..., heads_version: _Optional[int] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("name", "template", "labels", "description", "objective", "prior_correction", "adapt_prior", "inputs", "retrieval_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    ADAPT_PRIOR_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    template: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    description: str
    objective: str
    prior_correction: bool
    adapt_prior: bool
    inputs: _containers.RepeatedScalarFieldContainer[str]
    retrieval_key: str
    def __init__(self, name: _Optional[str] = ..., template: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., description: _Optional[str] = ..., objective: _Optional[str] = ..., prior_correction: _Optional[bool] = ..., adapt_prior: _Optional[bool] = ..., inputs: _Optional[_Iterable[str]] = ..., retrieval_key: _Optional[str] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTaskStatsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTaskStatsResponse(_message.Message):
    __slots__ = ("name", "window", "answers", "exit_layer_counts", "depth", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "since", "key_answers", "coverage_checked", "outside_coverage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_COUNTS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P90_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    KEY_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_CHECKED_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    window: int
    answers: int
    exit_layer_counts: _containers.RepeatedScalarFieldContainer[int]
    depth: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    since: str
    key_answers: int
    coverage_checked: int
    outside_coverage: int
    def __init__(self, name: _Optional[str] = ..., window: _Optional[int] = ..., answers: _Optional[int] = ..., exit_layer_counts: _Optional[_Iterable[int]] = ..., depth: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p90_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., since: _Optional[str] = ..., key_answers: _Optional[int] = ..., coverage_checked: _Optional[int] = ..., outside_coverage: _Optional[int] = ...) -> None: ...
