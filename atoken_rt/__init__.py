"""atoken_rt: a fast, faithful runtime for the AToken vision tokenizer (arXiv 2509.14476).

    import atoken_rt
    sess = atoken_rt.Session("atoken-sod", "atoken-sod.pt")
    enc = sess.encode([image_uint8_hw3, video_thw3, atoken_rt.Voxels(coords, feats)])
    dec = sess.decode(enc)
"""

# First: in a source checkout, map kernels/ and configs/ into the package namespace.
from . import _source_tree  # noqa: F401, I001
from .buffers import EncodeBuffers
from .checkpoint import (CheckpointMismatch, convert_checkpoint, expected_checkpoint_keys,
                         read_state_dict)
from .config import (ATokenConfig, FSQConfig, GSConfig, TowerConfig, list_presets, load_config,
                     load_gs_config)
from .inputs import SampleInfo, Voxels
from .limits import DEFAULT_LIMITS, Limits
from .session import (DecodeResult, EncodeResult, Handle, InputWarning, RandomWeightsWarning,
                      Session)
from .static import Bucket, BucketSet
from .stream import DecodedFrames, FlushReport, StreamChunk, VideoDecodeStream, VideoStream

__version__ = "0.1.0"

__all__ = [
    "Session", "EncodeResult", "DecodeResult", "Voxels", "SampleInfo", "InputWarning",
    "RandomWeightsWarning", "ATokenConfig", "TowerConfig", "FSQConfig", "GSConfig", "load_config",
    "load_gs_config", "list_presets", "expected_checkpoint_keys", "convert_checkpoint",
    "read_state_dict", "CheckpointMismatch", "Handle", "Bucket", "BucketSet", "__version__",
    "EncodeBuffers", "VideoStream", "VideoDecodeStream", "StreamChunk", "DecodedFrames", "FlushReport",
    "Limits", "DEFAULT_LIMITS",
]
