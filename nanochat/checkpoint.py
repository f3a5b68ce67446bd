"""
Checkpoints: atomic save and explicit load of model + optimizer + dataloader state + meta.

Layout of one checkpoint directory (<base>/<stage>_checkpoints/<tag>/), per step S (6 digits):
    model_S.pt               fp32 model state dict (rank 0)
    optim_S_rank{r}.pt       this rank's optimizer shard (any world size can reload the set)
    loader_S_rank{r}.pt      this rank's dataloader state
    meta_S.json              config, step, args, tokenizer fingerprint, loop state, list of files

Every file is written to a temp name and renamed into place; meta is written last, after every rank
has written its files, and is the commit marker: a step without meta (a crash mid-save) is ignored,
so the previous checkpoint stays the latest usable one.

Loaders never guess: they print which tag and step they load; a missing or ambiguous tag is an error
that lists what exists; a checkpoint trained with another tokenizer is refused.
"""

import io
import os
import re
import json
import glob

import torch
import torch.distributed as dist

from nanochat.common import UserError, get_base_dir, atomic_write_bytes, atomic_write_json, print0

STAGE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}


class CheckpointError(UserError, RuntimeError):
    pass


def stage_dir(source):
    if source not in STAGE_DIRS:
        raise CheckpointError(f"unknown checkpoint source {source!r}: use one of {', '.join(STAGE_DIRS)}")
    return os.path.join(get_base_dir(), STAGE_DIRS[source])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _save_torch(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def list_steps(ckpt_dir):
    """Steps with a complete checkpoint (meta present and every file it lists present), ascending."""
    steps = []
    for meta_path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        m = re.search(r"meta_(\d+)\.json$", meta_path)  # a regex: splitting on "_" breaks on tags with underscores
        if not m:
            continue
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if all(os.path.exists(os.path.join(ckpt_dir, name)) for name in meta.get("files", [])):
            steps.append(int(m.group(1)))
    return sorted(steps)


def save_checkpoint(ckpt_dir, step, meta, model_state=None, optim_state=None, loader_state=None,
                    rank=0, world_size=1, keep_last=None):
    """Collective under torchrun: every rank calls it. Rank 0 passes model_state and meta; each rank
    its own optim_state and loader_state. Returns the meta path."""
    os.makedirs(ckpt_dir, exist_ok=True)  # every rank: each writes its own optimizer shard, so
    # creating the folder on rank 0 alone races the others
    tag = f"{step:06d}"
    if optim_state is not None:
        _save_torch(optim_state, os.path.join(ckpt_dir, f"optim_{tag}_rank{rank}.pt"))
    if loader_state is not None:
        _save_torch(loader_state, os.path.join(ckpt_dir, f"loader_{tag}_rank{rank}.pt"))
    if rank == 0:
        _save_torch(model_state, os.path.join(ckpt_dir, f"model_{tag}.pt"))
    _barrier()
    meta_path = os.path.join(ckpt_dir, f"meta_{tag}.json")
    if rank == 0:
        files = [f"model_{tag}.pt"]
        if optim_state is not None:
            files += [f"optim_{tag}_rank{r}.pt" for r in range(world_size)]
        if loader_state is not None:
            files += [f"loader_{tag}_rank{r}.pt" for r in range(world_size)]
        atomic_write_json(meta_path, {**meta, "step": step, "world_size": world_size, "files": files})
        if keep_last:
            for old in list_steps(ckpt_dir)[:-keep_last]:
                for path in glob.glob(os.path.join(ckpt_dir, f"*_{old:06d}*")):
                    os.remove(path)
    _barrier()
    return meta_path


def _load_torch(path):
    # mmap: a resume on M ranks has every rank read every rank's optimizer shard; mapped files share one
    # copy in the page cache of a node instead of each rank holding a private copy of the whole state.
    # (A filesystem that cannot mmap gets a plain read.)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except OSError:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              f"delete this step's files to fall back to the previous checkpoint") from None


def resolve_checkpoint(source, model_tag=None, step=None):
    """(checkpoint dir, step) for a stage, refusing to guess between several tags."""
    root = stage_dir(source)
    tags = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if model_tag is None:
        if not tags:
            raise CheckpointError(f"no {source} checkpoints under {root}: train one first")
        if len(tags) > 1:
            raise CheckpointError(f"several {source} checkpoint tags under {root}: {', '.join(tags)}; "
                                  f"choose one with --model-tag")
        model_tag = tags[0]
    ckpt_dir = os.path.join(root, model_tag)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no {source} checkpoint tag {model_tag!r} under {root} "
                              f"(available: {', '.join(tags) or 'none'})")
    steps = list_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no complete checkpoint at step {step} in {ckpt_dir} (available: {steps})")
    return ckpt_dir, step


def load_checkpoint(ckpt_dir, step, load_optimizer=False, load_loader=False):
    """(model_state, meta, optimizer shards of every saved rank or None, loader states of every saved
    rank or None). Both are lists so that a run saved on N ranks can resume on M."""
    tag = f"{step:06d}"
    meta_path = os.path.join(ckpt_dir, f"meta_{tag}.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from None
    model_state = _load_torch(os.path.join(ckpt_dir, f"model_{tag}.pt"))
    optim_shards = None
    if load_optimizer:
        paths = [os.path.join(ckpt_dir, f"optim_{tag}_rank{r}.pt") for r in range(meta["world_size"])]
        optim_shards = [_load_torch(p) for p in paths] if all(os.path.exists(p) for p in paths) else None
    loader_states = None
    if load_loader:
        paths = [os.path.join(ckpt_dir, f"loader_{tag}_rank{r}.pt") for r in range(meta["world_size"])]
        if all(os.path.exists(p) for p in paths):
            loader_states = [_load_torch(p) for p in paths]
    return model_state, meta, optim_shards, loader_states


def model_from_state(model_state, meta, device, compute_dtype=torch.float32):
    """The GPT a checkpoint's meta describes, with its weights (fp32 masters; a compiled model's keys
    carry torch.compile's "_orig_mod." prefix, removed as a prefix: str.lstrip would strip characters)."""
    from nanochat.gpt import GPTConfig, build_model
    model = build_model(GPTConfig(**meta["model_config"]), device, compute_dtype)
    model.load_state_dict({k.removeprefix("_orig_mod."): v.float() for k, v in model_state.items()}, strict=True)
    return model


def check_tokenizer(meta, tokenizer, where):
    want = meta.get("tokenizer_fingerprint")
    if want and want != tokenizer.fingerprint:
        raise CheckpointError(
            f"{where} was trained with a different tokenizer (fingerprint {want[:12]}) than the one in "
            f"{os.path.join(get_base_dir(), 'tokenizer')} ({tokenizer.fingerprint[:12]}); its outputs would be "
            f"gibberish. Use the tokenizer it was trained with, or retrain the model.")


def load_model(source, device, phase="eval", model_tag=None, step=None, compute_dtype=None, tokenizer=None):
    """Build a model from a checkpoint of a stage ('base', 'mid', 'sft', 'rl'). Returns (model, tokenizer,
    meta). Prints which tag and step it loaded. (An HF export folder: nanochat.hf_convert.load_any.)"""
    from nanochat.tokenizer import get_tokenizer
    ckpt_dir, step = resolve_checkpoint(source, model_tag, step)
    model_state, meta, _, _ = load_checkpoint(ckpt_dir, step)
    tokenizer = tokenizer or get_tokenizer()
    check_tokenizer(meta, tokenizer, f"checkpoint {ckpt_dir} step {step}")
    vocab = meta["model_config"]["vocab_size"]
    if vocab != tokenizer.get_vocab_size():
        raise CheckpointError(f"checkpoint vocab {vocab} != tokenizer vocab {tokenizer.get_vocab_size()}")
    model = model_from_state(model_state, meta, device, compute_dtype or torch.float32)
    model.train(phase == "train")
    print0(f"Loaded {source} checkpoint {os.path.basename(ckpt_dir)} step {step} from {ckpt_dir}")
    return model, tokenizer, meta
