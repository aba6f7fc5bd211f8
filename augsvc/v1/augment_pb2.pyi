from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputSize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEEPS_SIZE: _ClassVar[OutputSize]
    SETS_SIZE: _ClassVar[OutputSize]
    CHANGES_SIZE: _ClassVar[OutputSize]
KEEPS_SIZE: OutputSize
SETS_SIZE: OutputSize
CHANGES_SIZE: OutputSize
BOUNDS_FIELD_NUMBER: _ClassVar[int]
bounds: _descriptor.FieldDescriptor
OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
output_size: _descriptor.FieldDescriptor

class Bounds(_message.Message):
    __slots__ = ("min", "max", "default", "default_range", "required", "length", "ordered", "exclusive_min", "choices")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RANGE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_MIN_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    default: float
    default_range: _containers.RepeatedScalarFieldContainer[float]
    required: bool
    length: int
    ordered: bool
    exclusive_min: bool
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., default: _Optional[float] = ..., default_range: _Optional[_Iterable[float]] = ..., required: _Optional[bool] = ..., length: _Optional[int] = ..., ordered: _Optional[bool] = ..., exclusive_min: _Optional[bool] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class HFlip(_message.Message):
    __slots__ = ("p",)
    P_FIELD_NUMBER: _ClassVar[int]
    p: float
    def __init__(self, p: _Optional[float] = ...) -> None: ...

class VFlip(_message.Message):
    __slots__ = ("p",)
    P_FIELD_NUMBER: _ClassVar[int]
    p: float
    def __init__(self, p: _Optional[float] = ...) -> None: ...

class Rotate(_message.Message):
    __slots__ = ("limit_range", "p")
    LIMIT_RANGE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    limit_range: _containers.RepeatedScalarFieldContainer[float]
    p: float
    def __init__(self, limit_range: _Optional[_Iterable[float]] = ..., p: _Optional[float] = ...) -> None: ...

class Translate(_message.Message):
    __slots__ = ("x_range", "y_range", "p")
    X_RANGE_FIELD_NUMBER: _ClassVar[int]
    Y_RANGE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    x_range: _containers.RepeatedScalarFieldContainer[float]
    y_range: _containers.RepeatedScalarFieldContainer[float]
    p: float
    def __init__(self, x_range: _Optional[_Iterable[float]] = ..., y_range: _Optional[_Iterable[float]] = ..., p: _Optional[float] = ...) -> None: ...

class Scale(_message.Message):
    __slots__ = ("scale_range", "p")
    SCALE_RANGE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    scale_range: _containers.RepeatedScalarFieldContainer[float]
    p: float
    def __init__(self, scale_range: _Optional[_Iterable[float]] = ..., p: _Optional[float] = ...) -> None: ...

class Color(_message.Message):
    __slots__ = ("brightness", "contrast", "saturation", "hue", "p")
    BRIGHTNESS_FIELD_NUMBER: _ClassVar[int]
    CONTRAST_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    HUE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float
    def __init__(self, brightness: _Optional[float] = ..., contrast: _Optional[float] = ..., saturation: _Optional[float] = ..., hue: _Optional[float] = ..., p: _Optional[float] = ...) -> None: ...

class Resize(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class ResizeShorter(_message.Message):
    __slots__ = ("side",)
    SIDE_FIELD_NUMBER: _ClassVar[int]
    side: int
    def __init__(self, side: _Optional[int] = ...) -> None: ...

class RandomResizedCrop(_message.Message):
    __slots__ = ("height", "width", "scale_range", "ratio_range")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SCALE_RANGE_FIELD_NUMBER: _ClassVar[int]
    RATIO_RANGE_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    scale_range: _containers.RepeatedScalarFieldContainer[float]
    ratio_range: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., scale_range: _Optional[_Iterable[float]] = ..., ratio_range: _Optional[_Iterable[float]] = ...) -> None: ...

class CenterCrop(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class CoarseDropout(_message.Message):
    __slots__ = ("num_holes_range", "hole_height_range", "hole_width_range", "fill", "p")
    NUM_HOLES_RANGE_FIELD_NUMBER: _ClassVar[int]
    HOLE_HEIGHT_RANGE_FIELD_NUMBER: _ClassVar[int]
    HOLE_WIDTH_RANGE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    num_holes_range: _containers.RepeatedScalarFieldContainer[int]
    hole_height_range: _containers.RepeatedScalarFieldContainer[float]
    hole_width_range: _containers.RepeatedScalarFieldContainer[float]
    fill: float
    p: float
    def __init__(self, num_holes_range: _Optional[_Iterable[int]] = ..., hole_height_range: _Optional[_Iterable[float]] = ..., hole_width_range: _Optional[_Iterable[float]] = ..., fill: _Optional[float] = ..., p: _Optional[float] = ...) -> None: ...

class GaussianBlur(_message.Message):
    __slots__ = ("sigma_range", "p")
    SIGMA_RANGE_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    sigma_range: _containers.RepeatedScalarFieldContainer[float]
    p: float
    def __init__(self, sigma_range: _Optional[_Iterable[float]] = ..., p: _Optional[float] = ...) -> None: ...

class Transform(_message.Message):
    __slots__ = ("hflip", "vflip", "rotate", "scale", "color", "resize", "random_resized_crop", "coarse_dropout", "gaussian_blur", "center_crop", "translate", "resize_shorter")
    HFLIP_FIELD_NUMBER: _ClassVar[int]
    VFLIP_FIELD_NUMBER: _ClassVar[int]
    ROTATE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_RESIZED_CROP_FIELD_NUMBER: _ClassVar[int]
    COARSE_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    GAUSSIAN_BLUR_FIELD_NUMBER: _ClassVar[int]
    CENTER_CROP_FIELD_NUMBER: _ClassVar[int]
    TRANSLATE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SHORTER_FIELD_NUMBER: _ClassVar[int]
    hflip: HFlip
    vflip: VFlip
    rotate: Rotate
    scale: Scale
    color: Color
    resize: Resize
    random_resized_crop: RandomResizedCrop
    coarse_dropout: CoarseDropout
    gaussian_blur: GaussianBlur
    center_crop: CenterCrop
    translate: Translate
    resize_shorter: ResizeShorter
    def __init__(self, hflip: _Optional[_Union[HFlip, _Mapping]] = ..., vflip: _Optional[_Union[VFlip, _Mapping]] = ..., rotate: _Optional[_Union[Rotate, _Mapping]] = ..., scale: _Optional[_Union[Scale, _Mapping]] = ..., color: _Optional[_Union[Color, _Mapping]] = ..., resize: _Optional[_Union[Resize, _Mapping]] = ..., random_resized_crop: _Optional[_Union[RandomResizedCrop, _Mapping]] = ..., coarse_dropout: _Optional[_Union[CoarseDropout, _Mapping]] = ..., gaussian_blur: _Optional[_Union[GaussianBlur, _Mapping]] = ..., center_crop: _Optional[_Union[CenterCrop, _Mapping]] = ..., translate: _Optional[_Union[Translate, _Mapping]] = ..., resize_shorter: _Optional[_Union[ResizeShorter, _Mapping]] = ...) -> None: ...

class Pipeline(_message.Message):
    __slots__ = ("transforms", "border", "fill", "strength")
    TRANSFORMS_FIELD_NUMBER: _ClassVar[int]
    BORDER_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    transforms: _containers.RepeatedCompositeFieldContainer[Transform]
    border: str
    fill: float
    strength: float
    def __init__(self, transforms: _Optional[_Iterable[_Union[Transform, _Mapping]]] = ..., border: _Optional[str] = ..., fill: _Optional[float] = ..., strength: _Optional[float] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class AugmentRequest(_message.Message):
    __slots__ = ("spec", "images", "encoded_images", "seed", "epoch", "sample_ids", "backend", "tag")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    spec: Pipeline
    images: Tensor
    encoded_images: _containers.RepeatedScalarFieldContainer[bytes]
    seed: int
    epoch: int
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    tag: int
    def __init__(self, spec: _Optional[_Union[Pipeline, _Mapping]] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., encoded_images: _Optional[_Iterable[bytes]] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., sample_ids: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., tag: _Optional[int] = ...) -> None: ...

class AugmentResponse(_message.Message):
    __slots__ = ("images", "sample_ids", "tag")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    tag: int
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., sample_ids: _Optional[_Iterable[int]] = ..., tag: _Optional[int] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("dataset", "spec", "seed", "epoch", "batch_size", "shuffle", "drop_last", "sample_ids", "start", "end", "stride", "backend", "shm_segments", "class_strength")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    spec: Pipeline
    seed: int
    epoch: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    start: int
    end: int
    stride: int
    backend: str
    shm_segments: _containers.RepeatedCompositeFieldContainer[ShmSegment]
    class_strength: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, dataset: _Optional[str] = ..., spec: _Optional[_Union[Pipeline, _Mapping]] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., batch_size: _Optional[int] = ..., shuffle: _Optional[bool] = ..., drop_last: _Optional[bool] = ..., sample_ids: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., stride: _Optional[int] = ..., backend: _Optional[str] = ..., shm_segments: _Optional[_Iterable[_Union[ShmSegment, _Mapping]]] = ..., class_strength: _Optional[_Iterable[float]] = ...) -> None: ...

class ShmSegment(_message.Message):
    __slots__ = ("name", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: bytes
    def __init__(self, name: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("epoch", "batch_index", "images", "labels", "sample_ids", "shm_segment")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    batch_index: int
    images: Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    shm_segment: str
    def __init__(self, epoch: _Optional[int] = ..., batch_index: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., sample_ids: _Optional[_Iterable[int]] = ..., shm_segment: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "num_samples", "num_classes", "class_names", "image_shape", "source", "layout", "decode_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DECODE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_samples: int
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    source: str
    layout: str
    decode_size: str
    def __init__(self, name: _Optional[str] = ..., num_samples: _Optional[int] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., image_shape: _Optional[_Iterable[int]] = ..., source: _Optional[str] = ..., layout: _Optional[str] = ..., decode_size: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "workers", "backends", "max_image_side", "max_batch_bytes", "max_inflight", "hostname", "pid", "decoder")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DECODER_FIELD_NUMBER: _ClassVar[int]
    version: str
    workers: int
    backends: _containers.RepeatedScalarFieldContainer[str]
    max_image_side: int
    max_batch_bytes: int
    max_inflight: int
    hostname: str
    pid: int
    decoder: str
    def __init__(self, version: _Optional[str] = ..., workers: _Optional[int] = ..., backends: _Optional[_Iterable[str]] = ..., max_image_side: _Optional[int] = ..., max_batch_bytes: _Optional[int] = ..., max_inflight: _Optional[int] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., decoder: _Optional[str] = ...) -> None: ...
