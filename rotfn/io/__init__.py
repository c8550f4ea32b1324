"""Durable and portable results: rotfn checkpoints, HF export, streaming fold of sharded checkpoints."""

# internal (not in __all__): what `rotfn inspect` / `rotfn fold` read from files, for rotfn.cli
# `name as name`: internal (not in __all__), what `rotfn inspect` / `rotfn fold` read, for rotfn.cli
from rotfn.io._checkpoint import GUARDED_MODEL_TYPE as GUARDED_MODEL_TYPE
from rotfn.io._checkpoint import inventory as inventory
from rotfn.io._checkpoint import is_guarded as is_guarded
from rotfn.io._checkpoint import skeleton
from rotfn.io._checkpoint import unguard_config as unguard_config
from rotfn.io._compressed import check_exportable as check_exportable  # internal: rotfn calibrate --export
from rotfn.io._compressed import export_compressed
from rotfn.io._encode import decode_plan as decode_plan
from rotfn.io._encode import rotation_tensor_names as rotation_tensor_names
from rotfn.io._file import METADATA_KEY as METADATA_KEY
from rotfn.io._file import load, save
from rotfn.io._file import read_file as read_file  # internal: rotfn.calibration's file is a rotfn file
from rotfn.io._file import write_file as write_file
from rotfn.io._hf import _shard_bytes as _shard_bytes  # internal: rotfn.cli checks --max-shard-size
from rotfn.io._hf import export_hf, load_hf
from rotfn.io._hf import read_rotfn_json as read_rotfn_json
from rotfn.io._progress import read_progress as read_progress
from rotfn.io._shard import read_header as read_header
from rotfn.io._stream import MARKER as MARKER
from rotfn.io._stream import FoldStats, fold_checkpoint

__all__ = ["save", "load", "export_hf", "export_compressed", "load_hf", "fold_checkpoint", "FoldStats", "skeleton"]
