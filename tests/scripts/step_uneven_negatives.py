"""One training step of real ZeRO-3 engines (every parameter partitioned) on 2 ranks, rank 1 with no valid negative;
prints the engine's loss and gradients next to a plain-torch computation on the concatenated batch (rank 0).

    torchrun --nproc_per_node 2 tests/scripts/step_uneven_negatives.py OUT.pt
"""
import copy
import sys

import open_clip
import torch
import torch.nn.functional as F

import clove_dist.model as cmodel
from clove_dist import dist as cdist
from clove_dist import zero
from clove_dist.config import DistributedConfig
from clove_dist.loss import ContrastiveLoss
from clove_dist.train import TrainStep

env = cdist.setup("cpu", "gloo")
import deepspeed  # noqa: E402  (after setup: DS_ACCELERATOR)
from deepspeed.utils import safe_get_full_grad  # noqa: E402

B, L = 4, 16
torch.manual_seed(0)
clip = open_clip.create_model("clove-micro")
oracle = copy.deepcopy(clip).double()
g = torch.Generator().manual_seed(1)
images = torch.randn(2, B, 3, 32, 32, generator=g)
texts = torch.randint(1, 500, (2, B, L), generator=g)
negatives = torch.randint(1, 500, (2, 6, L), generator=g)
valid = torch.tensor([[True, False, True, True, False, False], [False] * 6])  # rank 1: rows, none valid
owner = torch.tensor([[0, 1, 1, 3, -1, -1], [-1] * 6])  # the sample each negative row was made for

cmodel.make_deepspeed_safe(clip)
step = TrainStep(clip, ContrastiveLoss("chunked", chunk_size=3))
seen_dtypes = []
step.loss_fn.register_forward_pre_hook(
    lambda m, args, kwargs: seen_dtypes.append((args[0].dtype, kwargs["negative_features"].dtype)), with_kwargs=True)
dcfg = DistributedConfig(zero_stage=3, precision=sys.argv[2], stage3_param_persistence_threshold=0)
ds_cfg = zero.deepspeed_config(dcfg, B, 0.0, env.device)
engine, *_ = deepspeed.initialize(model=step, optimizer=torch.optim.SGD(clip.parameters(), lr=0.0), config=ds_cfg,
                                  dist_init_required=False)
r = env.rank
dtype = zero.compute_dtype(ds_cfg)
loss, _, watch = engine(images[r].to(dtype), texts[r], negatives[r], valid[r], owner[r])
engine.backward(loss)
grads = {n: safe_get_full_grad(p) for n, p in clip.named_parameters()}  # collective: every rank
losses = cdist.all_sum([float(loss), *watch.tolist()], env.device)

if r == 0:
    # plain torch, float64, one process, the whole batch: the loss the engines' mean must equal
    img = F.normalize(oracle.encode_image(images.reshape(2 * B, 3, 32, 32).double()), dim=-1)
    txt = F.normalize(oracle.encode_text(texts.reshape(2 * B, L)), dim=-1)
    neg = F.normalize(oracle.encode_text(negatives[valid]), dim=-1)
    s = oracle.logit_scale.exp().clamp(max=100)
    target = torch.arange(2 * B)
    ref = (F.cross_entropy(s * img @ torch.cat([txt, neg]).T, target) + F.cross_entropy(s * txt @ img.T, target)) / 2
    ref.backward()
    ref_grads = {n: p.grad.reshape(-1) for n, p in oracle.named_parameters()}
    torch.save({"loss": losses[0] / 2, "ref_loss": float(ref), "watch": losses[1:], "dtypes": [str(d) for d in seen_dtypes[0]],
                "grads": {n: v.reshape(-1).double() for n, v in grads.items()}, "ref_grads": ref_grads}, sys.argv[1])
# Rank 1 must not leave while rank 0 still computes the reference: rank 1 leaving early aborted once in gloo's
# teardown ("terminate called without an active exception").
cdist.barrier()
