"""Run under `torchrun --nproc_per_node 2`: `vqtok encode` of the digits into a store, recording the world size."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import PartialState  # noqa: E402

from vqtok.cli import main  # noqa: E402

tokenizer, out, *flags = sys.argv[1:]
code = main(["encode", "--tokenizer", tokenizer, "--out", out, *flags])
state = PartialState()
Path(f"{out}.world{state.process_index}.json").write_text(json.dumps({"world": state.num_processes}))
sys.exit(code)
