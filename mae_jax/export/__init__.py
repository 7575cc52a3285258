"""PyTorch interop: export to the official MAE / timm ViT layouts, import the released checkpoints.

Each format is one key table (`tables.FORMATS`) applied by one engine (`engine.py`) either way. torch and
safetensors are imported only when a PyTorch file is read or written.

  python -m mae_jax.export --workdir=DIR [--step=N] --format=mae-official --out=mae.pth
  python -m mae_jax.export import --format=mae-official --in=mae_pretrain_vit_base.pth \
      --config=configs/mae_vitb.py --allow_missing='decoder*,mask_token' --out=init.msgpack
"""
from mae_jax.export.engine import ConversionError
from mae_jax.export.tables import FORMATS
from mae_jax.export.torch_export import export_checkpoint, export_state_dict, save
from mae_jax.export.torch_import import (UnsafeFileError, import_file, import_state_dict, load_init_params,
                                         load_state_dict)
