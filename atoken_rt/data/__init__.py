"""Dataset-scale tokenization: sources -> sharded, resumable, deterministic Parquet tokens.

    summary = atoken_rt.data.tokenize(["photos/", "shards/*.tar"], "tokens/", config="atoken-sod",
                                      checkpoint="atoken-sod.pt", device="cuda", dtype="bf16",
                                      resize=256, crop=256)
    ds = atoken_rt.data.read_tokens("tokens/")

Modules: :mod:`~atoken_rt.data.sources` (folders, globs, WebDataset tars, Parquet, path lists),
:mod:`~atoken_rt.data.readers` (decode, resize/crop, video clips, limits),
:mod:`~atoken_rt.data.pipeline` (readers -> batches -> Session -> writer),
:mod:`~atoken_rt.data.shards` (schema, commit protocol, manifest, failures),
:mod:`~atoken_rt.data.api` (``tokenize``: fingerprint, resume, engines),
:mod:`~atoken_rt.data.ray_engine` (Ray Data), :mod:`~atoken_rt.data.read` (``read_tokens``).
Needs pyarrow (``pip install "atoken_rt[data]"``); the Ray engine needs ``ray[data]``.
"""

from .api import Summary, tokenize
from .read import TokenRow, TokenSet, read_tokens
from .readers import Preprocess
from .sources import Item, SourceError, enumerate_items

__all__ = ["tokenize", "Summary", "read_tokens", "TokenSet", "TokenRow", "Preprocess", "Item",
           "SourceError", "enumerate_items"]
