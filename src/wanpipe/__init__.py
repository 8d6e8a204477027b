"""wanpipe: a native PyTorch engine for the Wan video diffusion models."""

from wanpipe.config import WanArchConfig
from wanpipe.context import GenerationStatus, InvalidRequestError, Preview, WanContext, WanRequest
from wanpipe.executor import WanExecutor, WanExecutorInputs, WanExecutorOutputs
from wanpipe.media import Video
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.pipeline import WanOutOfMemoryError, WanPipeline
from wanpipe.tokenizer import WanTokenizer

__version__ = "0.1.0"

__all__ = [
    "GenerationStatus",
    "InvalidRequestError",
    "Preview",
    "Video",
    "WanArchConfig",
    "WanContext",
    "WanExecutor",
    "WanExecutorInputs",
    "WanExecutorOutputs",
    "WanOutOfMemoryError",
    "WanPipeline",
    "WanRequest",
    "WanTokenizer",
    "WanTransformerModel",
]
