"""Run under `torchrun --nproc_per_node 2`: one DDP training step per rank on half of a fixed batch, with DDP's
buffer broadcast off, then save each rank's quantizer state for the test to compare (tests/test_distributed.py)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from tests.scripts.common import (  # noqa: E402
    batch,
    ema_model,
    fsq_model,
    kmeans_restart_model,
    lfq_model,
    rvq_model,
    train_step,
)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, f"expected 2 ranks, got {world}"
out = Path(sys.argv[1])

x = batch()
local = x.chunk(world)[rank]
model = ema_model()
train_step(DistributedDataParallel(model, broadcast_buffers=False), model, local)

other = kmeans_restart_model()
ddp = DistributedDataParallel(other, broadcast_buffers=False)
restarted = sum(int(train_step(ddp, other, local).get("restarted", 0)) for _ in range(4))

fsq = fsq_model()  # statistics reduced once per step: perplexity and usage of the whole batch
fsq_stats = train_step(DistributedDataParallel(fsq, broadcast_buffers=False), fsq, local)
lfq = lfq_model()  # code and bit counts reduced once per step
lfq_stats = train_step(DistributedDataParallel(lfq, broadcast_buffers=False), lfq, local)
rvq = rvq_model()  # every level's EMA over the whole batch
rvq_stats = train_step(DistributedDataParallel(rvq, broadcast_buffers=False), rvq, local)

dropout = rvq_model(depth=3, quantizer_dropout=1.0).bottleneck  # the same seed and step on both ranks
dropout_masks = dropout._dropout_masks(torch.zeros(64, 4, 1, 1))

vq, vq2 = model.bottleneck, other.bottleneck
tensors = {"ema_count": vq.ema_count, "ema_sum": vq.ema_sum, "codebook": vq.codebook,
           "kmeans_codebook": vq2.codebook, "kmeans_ema_count": vq2.ema_count,
           "restarted": torch.tensor(restarted), "world": torch.tensor(world),
           "fsq_perplexity": fsq_stats["perplexity"], "fsq_usage": fsq_stats["usage"],
           "fsq_last_used": fsq.bottleneck.last_used, "lfq_last_used": lfq.bottleneck.last_used,
           "lfq_perplexity": lfq_stats["perplexity"], "lfq_bit_entropy": lfq_stats["bit_entropy"],
           "rvq_perplexity": rvq_stats["perplexity"], "rvq_dropout_masks": dropout_masks,
           **{f"rvq_{k}": v for k, v in rvq.bottleneck.state_dict().items() if "ema_count" in k or "codebook" in k}}
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
dist.destroy_process_group()
