from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitCorrectionRequest(_message.Message):
    __slots__ = ("utterance_id", "corrected_text")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    corrected_text: str
    def __init__(self, utterance_id: _Optional[str] = ..., corrected_text: _Optional[str] = ...) -> None: ...

class SubmitCorrectionResponse(_message.Message):
    __slots__ = ("feedback_id", "reward", "normalized_text", "flagged")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    feedback_id: int
    reward: float
    normalized_text: str
    flagged: bool
    def __init__(self, feedback_id: _Optional[int] = ..., reward: _Optional[float] = ..., normalized_text: _Optional[str] = ..., flagged: _Optional[bool] = ...) -> None: ...

class AcceptTranscriptRequest(_message.Message):
    __slots__ = ("utterance_id",)
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    def __init__(self, utterance_id: _Optional[str] = ...) -> None: ...

class AcceptTranscriptResponse(_message.Message):
    __slots__ = ("feedback_id", "reward")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    feedback_id: int
    reward: float
    def __init__(self, feedback_id: _Optional[int] = ..., reward: _Optional[float] = ...) -> None: ...

class RejectTranscriptRequest(_message.Message):
    __slots__ = ("utterance_id",)
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    def __init__(self, utterance_id: _Optional[str] = ...) -> None: ...

class RejectTranscriptResponse(_message.Message):
    __slots__ = ("feedback_id", "reward")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    feedback_id: int
    reward: float
    def __init__(self, feedback_id: _Optional[int] = ..., reward: _Optional[float] = ...) -> None: ...

class ChooseAlternativeRequest(_message.Message):
    __slots__ = ("utterance_id", "alternative_index")
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_INDEX_FIELD_NUMBER: _ClassVar[int]
    utterance_id: str
    alternative_index: int
    def __init__(self, utterance_id: _Optional[str] = ..., alternative_index: _Optional[int] = ...) -> None: ...

class ChooseAlternativeResponse(_message.Message):
    __slots__ = ("feedback_id", "reward", "chosen_text")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    feedback_id: int
    reward: float
    chosen_text: str
    def __init__(self, feedback_id: _Optional[int] = ..., reward: _Optional[float] = ..., chosen_text: _Optional[str] = ...) -> None: ...

class GetFeedbackStatsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class FeedbackStats(_message.Message):
    __slots__ = ("utterances", "utterances_with_audio", "feedback", "by_kind", "by_tenant", "by_model_version", "pending", "pending_flagged", "consumed", "flagged", "training_cycles")
    class ByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ByTenantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ByModelVersionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    UTTERANCES_FIELD_NUMBER: _ClassVar[int]
    UTTERANCES_WITH_AUDIO_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    BY_KIND_FIELD_NUMBER: _ClassVar[int]
    BY_TENANT_FIELD_NUMBER: _ClassVar[int]
    BY_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    PENDING_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CYCLES_FIELD_NUMBER: _ClassVar[int]
    utterances: int
    utterances_with_audio: int
    feedback: int
    by_kind: _containers.ScalarMap[str, int]
    by_tenant: _containers.ScalarMap[str, int]
    by_model_version: _containers.ScalarMap[str, int]
    pending: int
    pending_flagged: int
    consumed: int
    flagged: int
    training_cycles: int
    def __init__(self, utterances: _Optional[int] = ..., utterances_with_audio: _Optional[int] = ..., feedback: _Optional[int] = ..., by_kind: _Optional[_Mapping[str, int]] = ..., by_tenant: _Optional[_Mapping[str, int]] = ..., by_model_version: _Optional[_Mapping[str, int]] = ..., pending: _Optional[int] = ..., pending_flagged: _Optional[int] = ..., consumed: _Optional[int] = ..., flagged: _Optional[int] = ..., training_cycles: _Optional[int] = ...) -> None: ...

class DeleteUserDataRequest(_message.Message):
    __slots__ = ("tenant", "user_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    user_id: str
    def __init__(self, tenant: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class DeleteUserDataResponse(_message.Message):
    __slots__ = ("utterances_deleted", "feedback_deleted")
    UTTERANCES_DELETED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DELETED_FIELD_NUMBER: _ClassVar[int]
    utterances_deleted: int
    feedback_deleted: int
    def __init__(self, utterances_deleted: _Optional[int] = ..., feedback_deleted: _Optional[int] = ...) -> None: ...
