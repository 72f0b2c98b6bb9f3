"""Run under `torchrun --nproc_per_node 2`: a few training steps of the tiny config with `vqtok.train`, then save
the quantizer's state and the world size seen (compared with one process by tests/test_train.py)."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from tests.scripts.common import WORLD_INVARIANT_VQ, tiny_train_config  # noqa: E402
from vqtok.train import loop  # noqa: E402

out = Path(sys.argv[1])
HFLIP = os.environ.get("HFLIP", "1") == "1"
seen = {}
original = loop._export


def capture(accelerator, raw, *args, **kwargs):
    seen["world"] = accelerator.num_processes
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()},
              str(out / f"rank{accelerator.process_index}.safetensors"))
    return original(accelerator, raw, *args, **kwargs)


loop._export = capture
loop.train(tiny_train_config(str(out / "run"), vq=WORLD_INVARIANT_VQ, max_steps=4, hflip=HFLIP))
(out / f"world{os.environ['RANK']}.json").write_text(json.dumps(seen))
